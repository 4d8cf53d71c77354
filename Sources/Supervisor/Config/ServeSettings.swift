import Logging
import Shared

/// Everything `clipvisor serve` runs with: the built-in defaults, overridden by the config file
/// (`--config`), overridden by flags.
struct ServeSettings {
    var configuration = ServeConfiguration()
    /// The skip log; nil for the default (`SkipLog.defaultPath`).
    var skipLogPath: String?
    var quarantine = QuarantinePolicy()
    /// A merged skip ledger of other nodes to quarantine from (`QuarantineImport`); nil for none.
    var quarantineImportPath: String?
    var logLevel: Logger.Level = .info
    var logTarget: LogTarget = .auto
    /// Metrics: the HTTP listener (off by default), the textfile and how often it is written.
    var metricsListen: MetricsAddress?
    var metricsTextfile: String?
    var metricsIntervalMs = 15_000
    /// Where each knob that is not a default came from: a flag, or the file and line.
    private(set) var origins: [String: Origin] = [:]

    enum Origin: Equatable, CustomStringConvertible {
        case file(path: String, line: Int?)
        case flag(String)

        var description: String {
            switch self {
            case .file(let path, let line): line.map { "\(path):\($0)" } ?? path
            case .flag(let flag): flag
            }
        }
    }

    /// Defaults < `file` < `flags` (keyed by config-file key, as `ServeCommand.flagValues` makes
    /// them). Flags were checked one by one already (`checkFlags`); the file when it was loaded.
    /// What is checked here is what only the combination can get wrong.
    static func resolve(file: ConfigFile?, flags: [String: ConfigValue]) throws(ConfigError) -> ServeSettings {
        var settings = ServeSettings()
        if let file {
            for (name, value) in file.values {
                settings.apply(name, value)
                settings.origins[name] = .file(path: file.path, line: file.lines[name])
            }
        }
        for (name, value) in flags {
            settings.apply(name, value)
            settings.origins[name] = .flag(ConfigKey.byName[name]?.flag ?? name)
        }
        try settings.checkCombination()
        return settings
    }

    /// Checks each flag's value like a file value (paths may be relative here).
    static func checkFlags(_ flags: [String: ConfigValue]) throws(ConfigError) {
        var problems: [ConfigError.Problem] = []
        for name in flags.keys.sorted() {
            guard let key = ConfigKey.byName[name], let value = flags[name] else { continue }
            if let problem = key.problem(with: value, fromFile: false) {
                problems.append(.init(key: key.flag, message: problem))
            }
        }
        if !problems.isEmpty { throw ConfigError(problems: problems) }
    }

    private func checkCombination() throws(ConfigError) {
        if let cap = configuration.maxWorkers, cap < configuration.workers {
            throw ConfigError(problems: [
                problem("max_workers", "the cap on worker processes (\(cap)) is below the decode workers (\(configuration.workers))")
            ])
        }
        let deadline = configuration.deadlineDefaultMs
        let maximum = configuration.deadlineMaxMs
        if deadline > maximum {
            let blamed = origins["deadline"] != nil ? "deadline" : "max_deadline"
            throw ConfigError(problems: [
                problem(
                    blamed,
                    "the default deadline (\(describe("deadline", seconds: deadline))) is above the largest allowed "
                        + "(\(describe("max_deadline", seconds: maximum)))")
            ])
        }
    }

    private func describe(_ name: String, seconds milliseconds: Int) -> String {
        let value = "\(ConfigKey.format(Double(milliseconds) / 1000)) s"
        return origins[name].map { "\(value) from \($0)" } ?? "\(value), the default"
    }

    private func problem(_ name: String, _ message: String) -> ConfigError.Problem {
        switch origins[name] {
        case .file(let path, let line): .init(file: path, line: line, key: name, message: message)
        case .flag(let flag): .init(key: flag, message: message)
        case nil: .init(key: name, message: message)
        }
    }

    private mutating func apply(_ name: String, _ value: ConfigValue) {
        // Names come from the schema (the file's keys were checked against it, the flags are
        // its own): a name without a knob is a programming error, never user input.
        ConfigKey.named(name).apply(&self, value)
    }

}
