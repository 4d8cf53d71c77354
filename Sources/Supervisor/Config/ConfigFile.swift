import SystemPackage
import TOMLKit

#if canImport(Glibc)
import Glibc
#endif

/// What is wrong with the configuration: each problem names where it came from (the file,
/// line and key, or the flag) and what is wrong. `clipvisor serve` refuses to start on any.
struct ConfigError: Error, CustomStringConvertible, Equatable {
    struct Problem: Equatable, CustomStringConvertible {
        /// The config file; nil for a problem with a flag.
        var file: String?
        var line: Int?
        var column: Int?
        /// The key (file) or flag; nil for a syntax error or an unreadable file.
        var key: String?
        var message: String

        var description: String {
            var location = file ?? ""
            if file != nil, let line {
                location += ":\(line)"
                if let column { location += ":\(column)" }
            }
            let subject = key.map { file == nil ? "\($0)" : "key \"\($0)\"" }
            return [location.isEmpty ? nil : location, subject, message].compactMap { $0 }.joined(separator: ": ")
        }
    }

    var problems: [Problem]

    var description: String { problems.map(\.description).joined(separator: "\n") }
}

/// A parsed config file: the value of each key it sets, and the line each key is on.
struct ConfigFile: Equatable {
    var path: String
    var values: [String: ConfigValue] = [:]
    var lines: [String: Int] = [:]

    /// Reads and checks `path`: TOML syntax (line and column from the parser), unknown keys,
    /// wrong types and values out of range. Every problem is reported, in file order.
    static func load(_ path: String) throws(ConfigError) -> ConfigFile {
        let bytes: [UInt8]
        do {
            bytes = try Filesystem.contents(of: path)
        } catch {
            throw ConfigError(problems: [.init(file: path, message: "cannot read the config file: \(error)")])
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw ConfigError(problems: [.init(file: path, message: "the config file is not valid UTF-8")])
        }
        return try parse(text, path: path)
    }

    static func parse(_ text: String, path: String) throws(ConfigError) -> ConfigFile {
        if let bad = TOMLHeaderCheck.firstKeylessHeader(in: text) {
            throw ConfigError(problems: [
                .init(
                    file: path, line: bad.line, column: bad.column,
                    message: "TOML syntax error: \(bad.found)")
            ])
        }
        let table: TOMLTable
        do {
            table = try TOMLTable(string: text)
        } catch let error as TOMLParseError {
            throw ConfigError(problems: [
                .init(
                    file: path, line: error.source.begin.line, column: error.source.begin.column,
                    message: "TOML syntax error: \(error.description)")
            ])
        } catch {
            throw ConfigError(problems: [.init(file: path, message: "cannot parse the config file: \(error)")])
        }
        var file = ConfigFile(path: path)
        var problems: [ConfigError.Problem] = []
        let locator = TOMLKeyLocator(text: text)
        for name in table.keys {
            let line = locator.line(of: name)
            guard let key = ConfigKey.byName[name] else {
                var message = "unknown key"
                if let suggestion = ConfigKey.suggestion(for: name) { message += " (did you mean \"\(suggestion)\"?)" }
                problems.append(.init(file: path, line: line, key: name, message: message))
                continue
            }
            guard let node = table[name] else { continue }
            switch convert(node, for: key) {
            case .success(let value):
                if let problem = key.problem(with: value, fromFile: true) {
                    problems.append(.init(file: path, line: line, key: name, message: problem))
                } else {
                    file.values[name] = value
                    file.lines[name] = line
                }
            case .failure(let problem):
                problems.append(.init(file: path, line: line, key: name, message: problem.message))
            }
        }
        if !problems.isEmpty {
            throw ConfigError(problems: problems.sorted { ($0.line ?? .max, $0.key ?? "") < ($1.line ?? .max, $1.key ?? "") })
        }
        return file
    }

    private struct WrongType: Error { var message: String }

    /// The TOML value as the knob's kind wants it, or what is wrong with its type.
    private static func convert(_ node: TOMLValueConvertible, for key: ConfigKey) -> Result<ConfigValue, WrongType> {
        func wrong() -> Result<ConfigValue, WrongType> {
            .failure(WrongType(message: "expected \(key.expectation), got \(describe(node))"))
        }
        switch key.kind {
        case .path, .duration, .choice, .listenAddress, .pathOrOff:
            guard let string = node.string else { return wrong() }
            return .success(.string(string))
        case .integer:
            guard let integer = node.int else { return wrong() }
            return .success(.integer(integer))
        case .seconds:
            if let integer = node.int { return .success(.number(Double(integer))) }
            guard let number = node.double else { return wrong() }
            return .success(.number(number))
        case .bool:
            guard let bool = node.bool else { return wrong() }
            return .success(.bool(bool))
        case .mode(let options):
            if let bool = node.bool { return .success(.string(bool ? options[0] : options[options.count - 1])) }
            guard let string = node.string else { return wrong() }
            return .success(.string(string))
        case .paths:
            guard let array = node.array else { return wrong() }
            var strings: [String] = []
            for (index, element) in array.enumerated() {
                guard let string = element.string else {
                    return .failure(WrongType(message: "entry \(index + 1) must be a string (an absolute path), got \(describe(element))"))
                }
                strings.append(string)
            }
            return .success(.strings(strings))
        }
    }

    /// "a string (\"8\")", "an integer (8)", "a table".
    static func describe(_ node: TOMLValueConvertible) -> String {
        switch node.type {
        case .string: return "a string (\"\(node.string ?? "")\")"
        case .int: return "an integer (\(node.int.map(String.init) ?? "?"))"
        case .double: return "a floating-point number (\(node.double.map { String($0) } ?? "?"))"
        case .bool: return "a boolean (\(node.bool.map(String.init) ?? "?"))"
        case .array: return "an array"
        case .table: return "a table"
        case .date, .time, .dateTime: return "a \(node.type)"
        }
    }
}

/// Finds the line of a top-level key in TOML text (TOMLKit reports positions only for syntax
/// errors): `key = ...`, `"key" = ...`, `key.sub = ...`, or a table header `[key]`/`[[key]]`.
/// The text has already parsed, so a simple line scan that skips multi-line strings is enough.
struct TOMLKeyLocator {
    /// For each line (1-based index - 1): the top-level key it defines, if any.
    private var keys: [Int: String] = [:]

    init(text: String) {
        var lineNumber = 0
        var inHeaderTable = false
        var openMultiline: String?
        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            let line = rawLine.trimming(" \t\r")
            if let delimiter = openMultiline {
                if Self.count(delimiter, in: line) % 2 == 1 { openMultiline = nil }
                continue
            }
            if line.isEmpty || line.hasPrefix("#") { continue }
            if line.hasPrefix("[") {
                let header = line.drop { $0 == "[" }
                if let name = Self.firstKey(String(header)) { keys[lineNumber] = name }
                inHeaderTable = true
                continue
            }
            if !inHeaderTable, let name = Self.firstKey(line), line.contains("=") {
                keys[lineNumber] = name
            }
            for delimiter in ["\"\"\"", "'''"] where Self.count(delimiter, in: line) % 2 == 1 {
                openMultiline = delimiter
            }
        }
    }

    /// The first line defining `key`, or nil.
    func line(of key: String) -> Int? {
        keys.filter { $0.value == key }.keys.min()
    }

    /// The first (possibly quoted) component of a key expression: `"a b".c = 1` → `a b`.
    private static func firstKey(_ line: String) -> String? {
        guard let first = line.first else { return nil }
        if first == "\"" || first == "'" {
            let rest = line.dropFirst()
            guard let end = rest.firstIndex(of: first) else { return nil }
            return String(rest[..<end])
        }
        let name = line.prefix { $0.isLetter || $0.isNumber || $0 == "_" || $0 == "-" }
        return name.isEmpty ? nil : String(name)
    }

    private static func count(_ needle: String, in line: String) -> Int {
        line.components(separatedByString: needle) - 1
    }
}

extension String {
    /// The number of pieces `self` splits into at `separator` (no Foundation).
    fileprivate func components(separatedByString separator: String) -> Int {
        guard !separator.isEmpty else { return 1 }
        var count = 1
        var rest = Substring(self)
        while let range = rest.firstRange(of: separator) {
            count += 1
            rest = rest[range.upperBound...]
        }
        return count
    }
}

/// toml++ (inside TOMLKit) asserts, and so aborts the whole process, on two kinds of bad input
/// that it otherwise reports (both found by bench/fuzz.sh; regression tests in ConfigFuzzRegressionTests):
/// - a table header whose key does not start with a key character: `[` or `[[` followed (after
///   spaces) by a newline, `#`, `=`, `[`... (`[ ]` and `[a.` are reported properly);
/// - a `}` where an array expects a value: `a = [ }`, `a = [1, }`;
/// - a date followed by a space and a one-digit "time": `a = 1979-05-27 7` (toml++ scans on past
///   the digit when a value terminator follows). Such text is never valid TOML, so any character but
///   a digit or `:` after that digit is refused.
/// Until the library checks these itself, this scan finds them first, so a bad file is refused with
/// its line, never a crash. It follows TOML just enough for that: strings, comments, a leading BOM,
/// and the nesting of arrays and inline tables in values (a header can start only outside them).
enum TOMLHeaderCheck {
    static func firstKeylessHeader(in text: String) -> (line: Int, column: Int, found: String)? {
        let b = Array(text.utf8)
        var i = b.starts(with: [0xEF, 0xBB, 0xBF]) ? 3 : 0  // toml++ skips a UTF-8 byte order mark
        var line = 1
        var lineStart = i
        var open: [UInt8] = []  // the arrays `[` and inline tables `{` of a value, innermost last
        var atLineStart = true
        func at(_ k: Int) -> UInt8? { k < b.count ? b[k] : nil }
        func skipString(quote: UInt8, escapes: Bool) {
            let triple = at(i + 1) == quote && at(i + 2) == quote
            i += triple ? 3 : 1
            while i < b.count {
                if escapes, b[i] == UInt8(ascii: "\\") {
                    if at(i + 1) == UInt8(ascii: "\n") {
                        line += 1
                        lineStart = i + 2
                    }
                    i += 2
                    continue
                }
                if b[i] == UInt8(ascii: "\n") {
                    if !triple { return }
                    line += 1
                    lineStart = i + 1
                } else if b[i] == quote {
                    guard triple else {
                        i += 1
                        return
                    }
                    // A run of 3 to 5 quotes closes it (TOML allows two quotes of content just
                    // before the delimiter): `''''` is `'` then the end.
                    var run = 0
                    while at(i + run) == quote { run += 1 }
                    i += run
                    if run >= 3 { return }
                    continue
                }
                i += 1
            }
        }
        while i < b.count {
            let c = b[i]
            switch c {
            case UInt8(ascii: "\n"):
                line += 1
                lineStart = i + 1
                atLineStart = true
                i += 1
                continue
            case UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\r"):
                i += 1
                continue
            case UInt8(ascii: "#"):
                while i < b.count, b[i] != UInt8(ascii: "\n") { i += 1 }
                continue
            case UInt8(ascii: "\""), UInt8(ascii: "'"):
                skipString(quote: c, escapes: c == UInt8(ascii: "\""))
            case UInt8(ascii: "[") where open.isEmpty && atLineStart:
                var k = i + 1
                if at(k) == UInt8(ascii: "[") { k += 1 }
                while let n = horizontalSpace(b, at: k) { k += n }
                if let f = at(k), !isKeyStart(f) {
                    let shown = f == UInt8(ascii: "\n") ? "a newline" : f == UInt8(ascii: "\r") ? "a carriage return"
                        : f < 0x20 || f >= 0x7F ? "byte 0x\(String(f, radix: 16))" : "'\(Character(Unicode.Scalar(f)))'"
                    return (line, k - lineStart + 1, "a table header needs a key after '[', saw \(shown)")
                }
                while i < b.count, b[i] != UInt8(ascii: "\n") { i += 1 }  // the header line; toml++ checks the rest
                continue
            case UInt8(ascii: "0")...UInt8(ascii: "9") where i == 0 || valueStarts.contains(b[i - 1]):
                // A key (at the start of a line) ends at its `=`; a value only at a terminator.
                var end = i
                while end < b.count, !terminators.contains(b[end]), !(atLineStart && b[end] == UInt8(ascii: "=")) {
                    end += 1
                }
                // toml++ counts characters and skips `_`: keep one byte per character.
                let token = Array(b[i..<end].filter { $0 != UInt8(ascii: "_") && $0 & 0xC0 != 0x80 })
                let isDigit = { (c: UInt8?) in c.map { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) } ?? false }
                // "DATE D" then anything but a digit or `:` is never TOML (a time is HH:MM:SS).
                if token.count == 10, token[4] == UInt8(ascii: "-"), token[7] == UInt8(ascii: "-"),
                    at(end) == UInt8(ascii: " "), isDigit(at(end + 1)), !isDigit(at(end + 2)),
                    at(end + 2) != UInt8(ascii: ":")
                {
                    return (line, end + 1 - lineStart + 1, "a date needs a full time after the space (HH:MM:SS)")
                }
                i = end
                atLineStart = false
                continue
            case UInt8(ascii: "["), UInt8(ascii: "{"):
                open.append(c)
            case UInt8(ascii: "}") where open.last == UInt8(ascii: "["):
                return (line, i - lineStart + 1, "'}' inside an array")
            case UInt8(ascii: "]"), UInt8(ascii: "}"):
                _ = open.popLast()
            default:
                break
            }
            if c != UInt8(ascii: "\"") && c != UInt8(ascii: "'") { i += 1 }
            atLineStart = false
        }
        return nil
    }

    /// The length in bytes of the horizontal whitespace toml++ skips at `k` (space, tab, and the
    /// Unicode spaces U+00A0, U+1680, U+2000–U+200A, U+202F, U+205F, U+3000, U+FEFF), or nil.
    private static func horizontalSpace(_ b: [UInt8], at k: Int) -> Int? {
        func byte(_ j: Int) -> UInt8? { j < b.count ? b[j] : nil }
        switch byte(k) {
        case UInt8(ascii: " "), UInt8(ascii: "\t"): return 1
        case 0xC2 where byte(k + 1) == 0xA0: return 2
        case 0xE1 where byte(k + 1) == 0x9A && byte(k + 2) == 0x80: return 3
        case 0xE2 where byte(k + 1) == 0x80 && (byte(k + 2).map { (0x80...0x8A).contains($0) || $0 == 0xAF } ?? false): return 3
        case 0xE2 where byte(k + 1) == 0x81 && byte(k + 2) == 0x9F: return 3
        case 0xE3 where byte(k + 1) == 0x80 && byte(k + 2) == 0x80: return 3
        case 0xEF where byte(k + 1) == 0xBB && byte(k + 2) == 0xBF: return 3
        default: return nil
        }
    }

    /// Bytes that end a value for toml++ (whitespace, `,`, `]`, `}`, `#`), and bytes after which a value starts.
    private static let terminators: Set<UInt8> = Set(" \t\r\n,]}#".utf8)
    private static let valueStarts: Set<UInt8> = Set(" \t\n=[,{".utf8)

    /// A bare-key character (TOML 1.0: A-Z a-z 0-9 _ -), a quote, or the `]` of `[ ]` (reported by toml++).
    private static func isKeyStart(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
            UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "_"), UInt8(ascii: "-"),
            UInt8(ascii: "\""), UInt8(ascii: "'"), UInt8(ascii: "]"):
            return true
        default:
            return false
        }
    }
}
