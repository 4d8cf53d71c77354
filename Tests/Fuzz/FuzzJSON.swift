// libFuzzer harness: Sources/Shared/JSONParser.swift (every message the supervisor and the
// workers read goes through it). Built by bench/fuzz.sh, not by Package.swift.
//
// Besides "never crashes", it checks a property: whatever parses serializes back to JSON that
// parses to the same value.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzJSON(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let raw = UnsafeRawBufferPointer(start: data, count: size)
    guard let value = try? JSONParser.parse(raw) else { return 0 }
    let text = value.serialized()
    let again = text.withUnsafeBytes { try? JSONParser.parse($0) }
    if again != value, !containsNaNOrHuge(value) {
        fatalError("round trip changed the value: \(value) -> \(String(decoding: text, as: UTF8.self))")
    }
    return 0
}

/// Numbers whose text form cannot round-trip exactly (out of Double's range) are not a bug.
private func containsNaNOrHuge(_ v: JSONValue) -> Bool {
    switch v {
    case .number(let d): return !d.isFinite
    case .array(let a): return a.contains(where: containsNaNOrHuge)
    case .object(let o): return o.values.contains(where: containsNaNOrHuge)
    default: return false
    }
}
