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
