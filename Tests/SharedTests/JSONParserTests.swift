import Shared
import Testing

/// What the strict parser refuses, and where it says the problem is. Foundation's
/// JSONSerialization, measured on this toolchain, takes `{"path":"/a","path":"/etc/shadow"}` as
/// `/etc/shadow` without a word: a request whose meaning depends on which duplicate a reader
/// keeps is refused here instead.
@Suite struct JSONParserTests {
    private func refusal(_ text: String) -> String? {
        do {
            _ = try JSONValue.parse(Array(text.utf8))
            return nil
        } catch {
            return error.message
        }
    }

    @Test(arguments: [
        (#"{"path":"/a","path":"/etc/shadow"}"#, "byte 13: duplicate key \"path\""),
        (#"{"a":1} x"#, "byte 8: unexpected data after the JSON value"),
        (#"{"a":01}"#, "byte 6: expected ',' or '}'"),
        (#"{"a":1.}"#, "byte 7: expected a digit after '.'"),
        (#"{"a":1e}"#, "expected a digit in the exponent"),
        (#"{"a":1e999}"#, "number out of range"),
        (#"{"a":"\ud800"}"#, "unpaired surrogate"),
        (#"{"a":"\x"}"#, "invalid escape"),
        ("{\"a\":\"tab\there\"}", "control character in a string"),
        (#"{"a":tru}"#, "invalid literal"),
        (#"{"a" 1}"#, "expected ':'"),
        (#"{1:2}"#, "expected a string key"),
        (#"[1,2"#, "expected ',' or ']'"),
        (#"{"a":"x"#, "unterminated string"),
        ("", "unexpected end of input"),
        (#"NaN"#, "unexpected character"),
    ])
    func malformedInputIsRefusedWithItsByteOffset(text: String, expected: String) {
        let message = refusal(text)
        #expect(message?.contains(expected) == true, "\(text): \(message ?? "accepted")")
        #expect(message?.hasPrefix("malformed JSON at byte ") == true)
    }

    @Test func invalidUTF8IsRefused() {
        var bytes = Array(#"{"a":"x"}"#.utf8)
        bytes[6] = 0xFF
        #expect(throws: JSONError.self) { try JSONValue.parse(bytes) }
    }

    @Test func nestingIsCappedSoNoInputCanExhaustTheStack() {
        let deep = String(repeating: "[", count: 129) + String(repeating: "]", count: 129)
        #expect(refusal(deep)?.contains("nested deeper than 128") == true)
        let ok = String(repeating: "[", count: 128) + String(repeating: "]", count: 128)
        #expect(refusal(ok) == nil)
        let huge = String(repeating: "[", count: 100_000)
        #expect(refusal(huge)?.contains("nested deeper") == true)
    }

    @Test func validInputRoundTrips() throws {
        let text = #"{"a":[1,-2.5,3e2,true,false,null],"b":"é\n\u00e9\ud83d\ude00","c":{}}"#
        let value = try JSONValue.parse(Array(text.utf8))
        #expect(value["a"]?.arrayValue?.count == 6)
        #expect(value["b"]?.stringValue == "é\né😀")
        #expect(try JSONValue.parse(value.serialized()) == value)
    }
}
