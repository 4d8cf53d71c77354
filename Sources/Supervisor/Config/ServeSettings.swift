import Logging
import Shared

/// Everything `clipvisor serve` runs with: the built-in defaults, overridden by the config file
/// (`--config`), overridden by flags.
struct ServeSettings {
    var configuration = ServeConfiguration()
    /// The skip log; nil for the default (`SkipLog.defaultPath`).
    var skipLogPath: String?
    var quarantine = QuarantinePolicy()
    var logLevel: Logger.Level = .info
    var logTarget: LogTarget = .auto
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
        switch (name, value) {
        case ("socket", .string(let path)): configuration.socketPath = path
        case ("roots", .strings(let paths)): configuration.roots = paths
        case ("worker", .string(let path)): configuration.workerExecutable = path
        case ("workers", .integer(let count)): configuration.workers = count
        case ("spare_workers", .integer(let count)): configuration.spareWorkers = count
        case ("clips_per_worker", .integer(let count)): configuration.clipsPerWorker = count
        case ("deadline", .number(let seconds)): configuration.deadlineDefaultMs = Self.milliseconds(seconds)
        case ("max_deadline", .number(let seconds)): configuration.deadlineMaxMs = Self.milliseconds(seconds)
        case ("queue_limit", .integer(let count)): configuration.queueLimit = count
        case ("queue_wait", .number(let seconds)): configuration.queueWaitMs = Self.milliseconds(seconds)
        case ("worker_memory", .integer(let mib)): configuration.workerAddressSpaceMB = mib
        case ("worker_cpu_seconds", .integer(let seconds)): configuration.workerCPUSeconds = seconds
        case ("worker_open_files", .integer(let count)): configuration.workerOpenFiles = count
        case ("sandbox", .string(let text)): configuration.landlock = WorkerMessage.LandlockMode(rawValue: text) ?? configuration.landlock
        case ("max_source_pixels", .integer(let pixels)): configuration.maxSourcePixels = pixels
        case ("max_output_bytes", .integer(let bytes)): configuration.maxOutputBytes = bytes
        case ("memory_budget", .integer(let bytes)): configuration.memoryBudgetBytes = bytes
        case ("grace", .number(let seconds)): configuration.gracePeriodMs = Self.milliseconds(seconds)
        case ("skip_log", .string(let path)): skipLogPath = path
        case ("quarantine_timeouts", .integer(let count)): quarantine.timeoutsToQuarantine = count
        case ("quarantine_expiry", .string(let text)):
            quarantine.expiryMs = Timestamp.parseDuration(text) ?? quarantine.expiryMs
        case ("log_level", .string(let text)): logLevel = Logger.Level(rawValue: text) ?? logLevel
        case ("log_target", .string(let text)): logTarget = LogTarget(rawValue: text) ?? logTarget
        default:
            // The schema and this switch disagree: a programming error, never user input.
            preconditionFailure("config key \(name) with value \(value) has no setting")
        }
    }

    private static func milliseconds(_ seconds: Double) -> Int { Int((seconds * 1000).rounded()) }
}
