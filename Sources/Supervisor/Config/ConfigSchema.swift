import Logging
import Shared

/// A value of one `clipvisor serve` knob, from the config file or a flag.
enum ConfigValue: Equatable, Sendable, CustomStringConvertible {
    case string(String)
    case integer(Int)
    case number(Double)
    case bool(Bool)
    case strings([String])

    var description: String {
        switch self {
        case .string(let value): "\"\(value)\""
        case .integer(let value): String(value)
        case .number(let value): String(value)
        case .bool(let value): String(value)
        case .strings(let values): "[" + values.map { "\"\($0)\"" }.joined(separator: ", ") + "]"
        }
    }
}

/// One knob of `clipvisor serve`: its config-file key, its flag, and the values it takes.
/// The file's keys are the long options with `-` → `_` (`--clips-per-worker` → `clips_per_worker`),
/// except `roots` (`--root`, repeated).
struct ConfigKey: Sendable {
    enum Kind: Sendable {
        /// A path; absolute when it comes from the file (a service's working directory is `/`).
        case path
        case integer(ClosedRange<Int>)
        /// Seconds, an integer or a float, `> lower` (or `≥` when `lowerInclusive`) and `≤ upper`.
        case seconds(lower: Double, lowerInclusive: Bool, upper: Double)
        case bool
        /// A duration like `90s`, `15m`, `12h`, `7d`, `2w`.
        case duration
        case choice([String])
        /// One of `choices`, or a boolean for the first choice (`true`) or the last (`false`):
        /// `sandbox` was a boolean before it had a third value, and old files keep working.
        case mode([String])
        /// A list of absolute paths.
        case paths
        /// An IP literal and a port (`MetricsAddress`), or "off".
        case listenAddress
        /// A path (absolute in the file), or "off".
        case pathOrOff
    }

    let name: String
    let flag: String
    let kind: Kind
    /// What the knob does and why one would change it: the flag's --help, the example file's
    /// comment and the docs' table all say this.
    let help: String
    /// The built-in default, as people read it ("30", "4 × workers, at least 16").
    let defaultText: String
    /// The value systemd/clipvisor.toml gives it (a TOML expression), for a node with 8 workers.
    let example: String
    /// Sets the knob's value (already checked against `kind`) in the settings.
    let apply: @Sendable (inout ServeSettings, ConfigValue) -> Void

    /// Every knob, in the order of the example file (ConfigTable.swift).
    static let all: [ConfigKey] = ConfigKey.table

    static let byName: [String: ConfigKey] = Dictionary(uniqueKeysWithValues: all.map { ($0.name, $0) })

    /// What this knob expects, for messages ("an integer in 1...1024").
    var expectation: String {
        switch kind {
        case .path: "a path"
        case .integer(let range): "an integer in \(range.lowerBound)...\(range.upperBound)"
        case .seconds(let lower, let inclusive, let upper):
            "a number of seconds \(inclusive ? "≥" : ">") \(Self.format(lower)) and ≤ \(Self.format(upper))"
        case .bool: "true or false"
        case .duration: "a duration like \"90s\", \"15m\", \"12h\", \"7d\" or \"2w\""
        case .choice(let options): "one of " + options.map { "\"\($0)\"" }.joined(separator: ", ")
        case .mode(let options): "true, false or one of " + options.map { "\"\($0)\"" }.joined(separator: ", ")
        case .paths: "a list of absolute paths"
        case .listenAddress: "an address like \"127.0.0.1:9464\", \"[::1]:9464\", a port, or \"off\""
        case .pathOrOff: "a path or \"off\""
        }
    }

    /// Checks a value already of the right shape; returns what is wrong, or nil.
    /// `fromFile` requires absolute paths (flags may be relative to the working directory).
    func problem(with value: ConfigValue, fromFile: Bool) -> String? {
        switch (kind, value) {
        case (.path, .string(let path)):
            return Self.pathProblem(path, fromFile: fromFile)
        case (.integer(let range), .integer(let number)):
            return range.contains(number) ? nil : "must be \(expectation), got \(number)"
        case (.seconds(let lower, let inclusive, let upper), .number(let seconds)):
            let aboveLower = inclusive ? seconds >= lower : seconds > lower
            return aboveLower && seconds <= upper && seconds.isFinite ? nil : "must be \(expectation), got \(Self.format(seconds))"
        case (.bool, .bool):
            return nil
        case (.duration, .string(let text)):
            return Timestamp.parseDuration(text) == nil ? "must be \(expectation), got \(value)" : nil
        case (.choice(let options), .string(let text)), (.mode(let options), .string(let text)):
            return options.contains(text) ? nil : "must be \(expectation), got \(value)"
        case (.paths, .strings(let paths)):
            for path in paths where !path.hasPrefix("/") {
                return "every entry must be an absolute path, got \"\(path)\""
            }
            return nil
        case (.listenAddress, .string(let text)):
            if text != "off", case .failure(let error) = MetricsAddress.parse(text) { return "must be \(expectation): \(error)" }
            return nil
        case (.pathOrOff, .string(let text)):
            return text == "off" ? nil : Self.pathProblem(text, fromFile: fromFile)
        default:
            return "must be \(expectation), got \(value)"
        }
    }

    private static func pathProblem(_ path: String, fromFile: Bool) -> String? {
        if path.isEmpty { return "must not be empty" }
        if fromFile, !path.hasPrefix("/") { return "must be an absolute path, got \"\(path)\"" }
        return nil
    }

    static func format(_ seconds: Double) -> String {
        seconds == seconds.rounded() && abs(seconds) < 1e15 ? String(Int(seconds)) : String(seconds)
    }

    /// The known key closest to an unknown one (a typo, or a flag spelled with dashes).
    static func suggestion(for unknown: String) -> String? {
        let normalized = unknown.lowercased().replacingDashes()
        if byName[normalized] != nil { return normalized }
        let scored = all.map { ($0.name, editDistance(normalized, $0.name)) }.min { $0.1 < $1.1 }
        guard let (name, distance) = scored, distance <= max(2, normalized.count / 4) else { return nil }
        return name
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a.utf8)
        let b = Array(b.utf8)
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var previous = Array(0...b.count)
        var current = [Int](repeating: 0, count: b.count + 1)
        for i in 1...a.count {
            current[0] = i
            for j in 1...b.count {
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            swap(&previous, &current)
        }
        return previous[b.count]
    }
}

extension String {
    fileprivate func replacingDashes() -> String { String(map { $0 == "-" ? "_" : $0 }) }
}
