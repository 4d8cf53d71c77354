import ArgumentParser
import Foundation
import Shared
import Testing

@testable import Supervisor

/// `clipvisor serve --config FILE`: parsing, precedence (defaults < file < flags), and errors
/// that name the file, line and key.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct ConfigFileTests {
    /// The example shipped in systemd/, next to this package.
    static let examplePath = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../systemd/clipvisor.toml").standardized.path

    @Test func theExampleSetsEveryKeyAndEveryKeyIsDocumented() throws {
        let file = try ConfigFile.load(Self.examplePath)
        #expect(Set(file.values.keys) == Set(ConfigKey.all.map(\.name)))
        let text = try String(contentsOfFile: Self.examplePath, encoding: .utf8)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        for key in ConfigKey.all {
            let line = try #require(file.lines[key.name], "no line for \(key.name)")
            #expect(lines[line - 1].hasPrefix("\(key.name) ="), "line \(line) is not \(key.name): \(lines[line - 1])")
            #expect(lines[line - 2].hasPrefix("#"), "\(key.name) has no comment above it")
        }
        let settings = try ServeSettings.resolve(file: file, flags: [:])
        #expect(settings.configuration.workers == 8)
        #expect(settings.configuration.maxOutputBytes == 1 << 30)
        #expect(settings.configuration.socketPath == "/run/clipvisor/clipvisor.sock")
        #expect(settings.skipLogPath == "/var/lib/clipvisor/skips.jsonl")
    }

    @Test func precedenceIsDefaultsThenFileThenFlags() throws {
        let directory = TemporaryDirectory("config")
        let path = directory.file("c.toml")
        try """
            workers = 3
            deadline = 12.5
            queue_wait = 2
            sandbox = false
            roots = ["/data/a", "/data/b"]
            quarantine_expiry = "12h"
            log_level = "debug"
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let command = try ServeCommand.parse(["--config", path, "--workers", "5", "--root", "/x", "--sandbox", "required"])
        let settings = try command.resolveSettings()
        let defaults = ServeConfiguration()
        #expect(settings.configuration.workers == 5)  // flag over file
        #expect(settings.configuration.deadlineDefaultMs == 12_500)  // file over default
        #expect(settings.configuration.queueWaitMs == 2_000)
        #expect(settings.configuration.roots == ["/x"])  // --root replaces the file's list
        #expect(settings.configuration.landlock == .required)  // --sandbox over sandbox = false
        #expect(settings.configuration.clipsPerWorker == defaults.clipsPerWorker)  // default
        #expect(settings.configuration.deadlineMaxMs == defaults.deadlineMaxMs)
        #expect(settings.quarantine.expiryMs == 12 * 3_600_000)
        #expect(settings.logLevel == .debug)
        #expect(settings.skipLogPath == nil)

        let fileOnly = try ServeCommand.parse(["--config", path]).resolveSettings()
        #expect(fileOnly.configuration.roots == ["/data/a", "/data/b"])
        #expect(fileOnly.configuration.landlock == .off)  // false, as before there were three modes
        #expect(fileOnly.configuration.workers == 3)
        let none = try ServeCommand.parse([]).resolveSettings()
        #expect(none.configuration.workers == defaults.workers && none.configuration.roots.isEmpty)
    }

    /// (file text, line, key, what the message must say)
    static let badFiles: [(String, Int, String?, String)] = [
        ("workers = 4\nworker_count = 3\n", 2, "worker_count", "unknown key"),
        ("clips-per-worker = 3\n", 1, "clips-per-worker", "did you mean \"clips_per_worker\""),
        ("\n\n[deadlines]\ndefault = 3\n", 3, "deadlines", "unknown key"),
        ("workers = \"8\"\n", 1, "workers", "expected an integer in 1...1024, got a string (\"8\")"),
        ("# c\nsandbox = 1\n", 2, "sandbox", "expected true, false or one of \"auto\", \"required\", \"off\", got an integer (1)"),
        ("sandbox = \"strict\"\n", 1, "sandbox", "must be true, false or one of \"auto\", \"required\", \"off\", got \"strict\""),
        ("deadline = \"30s\"\n", 1, "deadline", "expected a number of seconds"),
        ("roots = \"/data\"\n", 1, "roots", "expected a list of absolute paths, got a string"),
        ("roots = [\"/data\", 7]\n", 1, "roots", "entry 2 must be a string"),
        ("workers = 0\n", 1, "workers", "must be an integer in 1...1024, got 0"),
        ("grace = -1\n", 1, "grace", "got -1"),
        ("deadline = 0\n", 1, "deadline", "> 0"),
        ("quarantine_expiry = \"7 days\"\n", 1, "quarantine_expiry", "a duration like"),
        ("log_level = \"loud\"\n", 1, "log_level", "must be one of"),
        ("socket = \"run/x.sock\"\n", 1, "socket", "must be an absolute path"),
        ("roots = [\"/data\", \"rel/x\"]\n", 1, "roots", "absolute path, got \"rel/x\""),
        ("workers = 2\n\nqueue_limit = = 3\n", 3, nil, "TOML syntax error"),
        ("workers = 2\nworkers = 3\n", 2, nil, "TOML syntax error"),
        ("\"max_deadline\" = 5\n", 1, "max_deadline", "is above the largest allowed"),
    ]

    @Test(arguments: 0..<badFiles.count)
    func aBadFileNamesTheLineTheKeyAndWhatIsWrong(index: Int) throws {
        let (text, line, key, fragment) = Self.badFiles[index]
        let directory = TemporaryDirectory("badconfig")
        let path = directory.file("bad.toml")
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        let error = try #require(throws: ConfigError.self) { try ServeCommand.parse(["--config", path]).resolveSettings() }
        let problem = try #require(error.problems.first)
        #expect(problem.file == path)
        #expect(problem.line == line, "\(error)")
        #expect(problem.key == key, "\(error)")
        #expect(error.description.contains(fragment), "\(error)")
        #expect(error.description.hasPrefix("\(path):\(line)"), "\(error)")
    }

    @Test func everyProblemOfAFileIsReportedInFileOrder() throws {
        let text = "log_level = \"x\"\nworkers = -1\nfoo = 1\n"
        let error = try #require(throws: ConfigError.self) { try ConfigFile.parse(text, path: "/etc/c.toml") }
        #expect(error.problems.map(\.line) == [1, 2, 3])
        #expect(error.problems.map(\.key) == ["log_level", "workers", "foo"])
    }

    @Test func aMissingFileOrABadFlagIsRefused() throws {
        let missing = try #require(throws: ConfigError.self) { try ConfigFile.load("/nonexistent/clipvisor.toml") }
        #expect(missing.description.contains("/nonexistent/clipvisor.toml: cannot read the config file"))
        #expect(throws: (any Error).self) { try ServeCommand.parse(["--workers", "0"]) }
        #expect(throws: (any Error).self) { try ServeCommand.parse(["--log-target", "syslog"]) }
        let crossed = try #require(throws: ConfigError.self) {
            try ServeCommand.parse(["--deadline", "100", "--max-deadline", "50"]).resolveSettings()
        }
        #expect(crossed.description.contains("--deadline"), "\(crossed)")
    }

    @Test func theServiceRefusesABadFileAtStartWithExitStatus78() throws {
        let directory = TemporaryDirectory("badstart")
        let path = directory.file("bad.toml")
        try "workers = 2\nqueue_wait = \"long\"\n".write(toFile: path, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Binaries.supervisor)
        process.arguments = ["serve", "--config", path, "--socket", directory.file("s.sock")]
        let pipe = Pipe()
        process.standardError = pipe
        try process.run()
        process.waitUntilExit()
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(process.terminationStatus == ServeCommand.configurationExitCode)
        #expect(text.contains("\(path):2: key \"queue_wait\": expected a number of seconds"), "\(text)")
        #expect(!FileManager.default.fileExists(atPath: directory.file("s.sock")))
    }

    @Test func aGoodFileRunsTheService() throws {
        let directory = TemporaryDirectory("goodstart")
        let path = directory.file("c.toml")
        try """
            workers = 1
            clips_per_worker = 7
            deadline = 9
            roots = ["/data"]
            skip_log = "\(directory.file("from-file.jsonl"))"
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let supervisor = try SupervisorProcess(arguments: ["--config", path], directory: directory)
        let status = try supervisor.status()
        #expect(status["workers"]?["target"]?.intValue == 1)
        #expect(status["workers"]?["clips_per_worker"]?.intValue == 7)
        #expect(status["deadlines"]?["default_ms"]?.intValue == 9000)
        // The harness's --skip-log flag wins over the file's skip_log.
        #expect(status["skip_log"]?["path"]?.stringValue == supervisor.skipLogPath)
        #expect(supervisor.stop() == 0)
    }
}
