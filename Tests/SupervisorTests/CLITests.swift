import Foundation
import Shared
import Testing

@testable import Supervisor

/// The command-line tools as users run them.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct CLITests {
    struct Output {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws -> Output {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        for (key, value) in environment { env[key] = value }
        process.environment = env
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Output(
            status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
            stderr: String(decoding: stderr, as: UTF8.self))
    }

    /// Every command's --help parses (ArgumentParser validates option names at that point: two
    /// options named alike would only fail here) and explains itself.
    @Test(arguments: [
        (Binaries.supervisor, [String]()), (Binaries.supervisor, ["serve"]), (Binaries.supervisor, ["decode"]),
        (Binaries.supervisor, ["probe"]), (Binaries.supervisor, ["status"]), (Binaries.supervisor, ["skips"]),
        (Binaries.worker, []), (Binaries.worker, ["decode"]), (Binaries.worker, ["probe"]), (Binaries.worker, ["serve"]),
    ])
    func helpExplainsEveryCommand(executable: String, command: [String]) throws {
        let output = try Self.run(executable, command + ["--help"])
        #expect(output.status == 0, "\(command): \(output.stderr)")
        #expect(output.stdout.contains("USAGE:"))
        #expect(output.stdout.count > 300, "the help of \(command) says too little")
    }

    /// With no supervisor running, `clipvisor decode` starts one for the call, and stops it after.
    @Test func decodeStartsAnEmbeddedSupervisorWhenNoneRuns() throws {
        let directory = TemporaryDirectory("cli")
        let clip = directory.file("clip.mp4")
        try Fixtures.clip(at: clip, seconds: 1)
        let environment = [
            "CLIPVISOR_SOCKET": directory.file("none.sock"), "XDG_RUNTIME_DIR": directory.path,
            "XDG_STATE_HOME": directory.file("state"),
        ]
        let output = try Self.run(Binaries.supervisor, ["decode", clip, "--frames", "4", "--json", "--out", directory.file("b.zst")], environment: environment)
        #expect(output.status == 0, "\(output.stderr)")
        let json = try JSONValue.parse(Array(output.stdout.utf8))
        #expect(json["result"]?["video"]?["pts"]?.arrayValue?.count == 4)
        let block = try [UInt8](Data(contentsOf: URL(fileURLWithPath: directory.file("b.zst"))))
        let (header, _) = try block.withUnsafeBytes { try BlockReader.read($0) }
        #expect(header.tensors.first?.shape.first == 4)
        // A missing file: exit status 1 and the reason as JSON.
        let missing = try Self.run(Binaries.supervisor, ["decode", directory.file("nope.mp4"), "--json"], environment: environment)
        #expect(missing.status == 1)
        #expect(try JSONValue.parse(Array(missing.stdout.utf8))["reason"] == "not_found")
        // No supervisor is left behind.
        #expect(!FileManager.default.fileExists(atPath: directory.file("none.sock")))
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: "/tmp").filter { $0.hasPrefix("clipvisor-embedded-") }
        for name in leftovers {
            let socket = "/tmp/\(name)/clipvisor.sock"
            #expect(!FileManager.default.fileExists(atPath: socket) || (try? SupervisorClient.connect(candidates: [socket], timeoutMs: 200)) == nil)
        }
    }

    /// `clipvisor skips` reads the log of the supervisor that answers, not the default location,
    /// and says which file it read; with none running, the default, said as such.
    @Test func skipsReadsTheRunningSupervisorsLogAndSaysWhich() throws {
        let directory = TemporaryDirectory("skipsdiscovery")
        let customLog = directory.file("data/skips.jsonl")
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--skip-log", customLog], directory: directory)
        let missing = directory.file("gone.mp4")
        let (answer, _) = try supervisor.client().decode(missing, ["tag": "disc-1"], timeoutMs: 20_000)
        #expect(answer.errorReason == "not_found")
        let environment = [
            "CLIPVISOR_SOCKET": supervisor.socketPath, "XDG_STATE_HOME": directory.file("elsewhere"),
            "STATE_DIRECTORY": "", "HOME": directory.file("home"),
        ]
        let listing = try Self.run(Binaries.supervisor, ["skips", "--json"], environment: environment)
        #expect(listing.status == 0, "\(listing.stderr)")
        let records = listing.stdout.split(separator: "\n").compactMap { try? JSONValue.parse(Array($0.utf8)) }
        #expect(records.contains { $0["path"]?.stringValue == missing && $0["tag"]?.stringValue == "disc-1" }, "\(listing.stdout)")
        #expect(listing.stderr.contains(customLog) && listing.stderr.contains("pid \(supervisor.pid)"), "\(listing.stderr)")
        let table = try Self.run(Binaries.supervisor, ["skips"], environment: environment)
        #expect(table.stdout.contains("1 skips in \(customLog)"), "\(table.stdout)")

        supervisor.stop()
        let fallback = try Self.run(Binaries.supervisor, ["skips", "--json"], environment: environment)
        #expect(fallback.status == 0)
        #expect(fallback.stdout.isEmpty, "the default location has no records: \(fallback.stdout)")
        #expect(fallback.stderr.contains(directory.file("elsewhere/clipvisor/skips.jsonl")) && fallback.stderr.contains("no supervisor answered"), "\(fallback.stderr)")
    }
}
