import Foundation
import Shared
import SystemPackage
import Testing

@testable import Supervisor

/// Where the package's binaries are: next to the test bundle in `.build/<config>/`.
enum Binaries {
    static let directory: String = {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        var url = URL(fileURLWithPath: exe).deletingLastPathComponent()
        // .build/debug/clipvisorPackageTests.xctest is itself the test binary on Linux.
        while !FileManager.default.fileExists(atPath: url.appendingPathComponent("clipvisor").path), url.path != "/" {
            url.deleteLastPathComponent()
        }
        return url.path
    }()
    static var supervisor: String { "\(directory)/clipvisor" }
    static var worker: String { "\(directory)/clipvisor-worker" }
}

/// The shared corpus of real media files from other projects' test suites.
enum Corpus {
    static let directory = "/work/shared/corpus/real"
    static func path(_ name: String) -> String {
        let candidates = [
            ProcessInfo.processInfo.environment["CLIPVISOR_CORPUS"].map { "\($0)/\(name)" },
            "\(directory)/\(name)",
            URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../../shared/corpus/real/\(name)").standardized.path,
        ].compactMap { $0 }
        return candidates.first { FileManager.default.fileExists(atPath: $0) } ?? candidates[1]
    }
}

/// A scratch directory removed at the end of a test.
final class TemporaryDirectory {
    let path: String

    init(_ label: String) {
        path = NSTemporaryDirectory() + "cv-\(label)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        chmod(path, 0o777)
    }

    func file(_ name: String) -> String { "\(path)/\(name)" }

    /// A copy of `source` named `name` in this directory (made once): fault markers live in names.
    func copy(of source: String, as name: String) throws -> String {
        let target = file(name)
        if !FileManager.default.fileExists(atPath: target) { try FileManager.default.copyItem(atPath: source, toPath: target) }
        return target
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Makes small deterministic clips with the ffmpeg CLI (never committed).
enum Fixtures {
    @discardableResult
    static func run(_ executable: String, _ arguments: [String]) throws -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// A testsrc2 H.264 clip with a sine tone.
    static func clip(at path: String, seconds: Double = 2, size: String = "320x240", rate: Int = 30) throws {
        guard !FileManager.default.fileExists(atPath: path) else { return }
        let status = try run("/usr/bin/ffmpeg", [
            "-nostdin", "-y", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=\(size):rate=\(rate)",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", String(seconds),
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "30", "-c:a", "aac", "-shortest", path,
        ])
        #expect(status == 0, "ffmpeg could not make \(path)")
    }

    static func fifo(at path: String) {
        mkfifo(path, 0o644)
    }
}

/// A real `clipvisor serve` process on a private socket, with its own skip log.
final class SupervisorProcess {
    let directory: TemporaryDirectory
    let socketPath: String
    let skipLogPath: String
    let process: Process
    let stderrPath: String

    init(
        arguments: [String] = [], environment: [String: String] = [:], label: String = "sup",
        directory: TemporaryDirectory? = nil, asUser: String? = nil
    ) throws {
        self.directory = directory ?? TemporaryDirectory(label)
        socketPath = self.directory.file("s.sock")
        skipLogPath = self.directory.file("state/skips.jsonl")
        stderrPath = self.directory.file("stderr-\(UInt32.random(in: 0...UInt32.max)).log")
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        process = Process()
        var argv = ["serve", "--socket", socketPath, "--skip-log", skipLogPath, "--log-level", "info"] + arguments
        if let asUser {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            argv = ["--reuid", asUser, "--regid", asUser, "--clear-groups", Binaries.supervisor] + argv
            // The binaries must be reachable by that user too.
            chmod(Binaries.directory, 0o755)
        } else {
            process.executableURL = URL(fileURLWithPath: Binaries.supervisor)
        }
        process.arguments = argv
        var env = ProcessInfo.processInfo.environment
        env.removeValue(forKey: "CLIPVISOR_SOCKET")
        for (key, value) in environment { env[key] = value }
        process.environment = env
        process.standardError = FileHandle(forWritingAtPath: stderrPath)
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        try waitUntilReady()
    }

    var pid: pid_t { process.processIdentifier }

    /// Waits until the socket answers `hello` and every worker is ready.
    func waitUntilReady(timeout: Double = 20) throws {
        let until = Date().addingTimeInterval(timeout)
        while Date() < until {
            if let client = try? SupervisorClient.connect(candidates: [socketPath], timeoutMs: 1000),
                let (answer, _) = try? client.call(["op": "status"], timeoutMs: 2000),
                let status = answer["status"],
                status["workers"]?["list"]?.arrayValue?.contains(where: { $0["state"]?.stringValue == "idle" }) == true
            {
                return
            }
            guard process.isRunning else { throw HarnessError("supervisor exited: \(stderr)") }
            usleep(50_000)
        }
        throw HarnessError("supervisor not ready within \(timeout) s: \(stderr)")
    }

    var stderr: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    func client(slabs: Int = 0) throws -> SupervisorClient {
        try SupervisorClient.connect(candidates: [socketPath], timeoutMs: 5000, slabs: slabs)
    }

    /// Polls `status` until `condition` holds; false after `timeout` seconds.
    func waitForStatus(timeout: Double = 10, _ condition: (JSONValue) -> Bool) -> Bool {
        let until = Date().addingTimeInterval(timeout)
        while Date() < until {
            if let status = try? status(), condition(status) { return true }
            usleep(20_000)
        }
        return false
    }

    func status() throws -> JSONValue {
        let (answer, _) = try client().call(["op": "status"], timeoutMs: 5000)
        return answer["status"] ?? .null
    }

    /// Stops with SIGTERM and waits; returns the exit status.
    @discardableResult
    func stop(signal: Int32 = SIGTERM) -> Int32 {
        if process.isRunning { kill(process.processIdentifier, signal) }
        process.waitUntilExit()
        return process.terminationStatus
    }

    deinit {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    // MARK: - What the supervisor holds

    /// Its open fds, as /proc shows them.
    func openFDs() -> [String] {
        let directory = "/proc/\(pid)/fd"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/\($0)") }
    }

    /// Its child processes that are zombies (exited, not reaped).
    func zombieChildren() -> [pid_t] {
        children().filter { $0.state == "Z" }.map(\.pid)
    }

    /// Its children that are workers: every child but the fork server.
    func workerProcesses() -> [(pid: pid_t, state: String)] {
        let forkServer = (try? status())?["workers"]?["start"]?["fork_server_pid"]?.intValue
        return children().filter { Int($0.pid) != forkServer }
    }

    func children() -> [(pid: pid_t, state: String)] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        var out: [(pid_t, String)] = []
        for entry in entries {
            guard let child = pid_t(entry),
                let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
                let close = stat.lastIndex(of: ")")
            else { continue }
            let fields = stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
            guard fields.count > 2, pid_t(fields[1]) == pid else { continue }
            out.append((child, String(fields[0])))
        }
        return out
    }

    /// Waits (briefly) for the supervisor to settle, then checks it leaks nothing.
    func expectClean(baselineFDs: Int, sourceLocation: SourceLocation = #_sourceLocation) throws {
        var fds: [String] = []
        for _ in 0..<100 {
            fds = openFDs()
            if fds.count <= baselineFDs, zombieChildren().isEmpty, !fds.contains(where: { $0.contains("memfd:") }) { break }
            usleep(50_000)
        }
        #expect(zombieChildren().isEmpty, "zombies: \(zombieChildren())", sourceLocation: sourceLocation)
        #expect(fds.count <= baselineFDs, "fds \(fds.count) > baseline \(baselineFDs): \(fds)", sourceLocation: sourceLocation)
        #expect(!fds.contains(where: { $0.contains("memfd:") }), "memfds left: \(fds)", sourceLocation: sourceLocation)
        let answer = try client().call(["op": "status"], timeoutMs: 5000).0
        #expect(answer["ok"]?.boolValue == true, "the supervisor no longer answers", sourceLocation: sourceLocation)
    }

    /// fds of a warm, idle supervisor with no connections: the baseline for leak checks. Taken
    /// only once every worker of the pool, spares included, is idle, since each holds fds.
    func settledFDCount() -> Int {
        _ = waitUntilPoolIsIdle()
        usleep(100_000)  // Lets the status connection's close be processed.
        return openFDs().count
    }

    /// True once target + spare workers are all live and idle.
    func waitUntilPoolIsIdle(timeout: Double = 20) -> Bool {
        waitForStatus(timeout: timeout) { status in
            let workers = status["workers"]
            let pool = (workers?["target"]?.intValue ?? 0) + (workers?["spare"]?.intValue ?? 0)
            let idle = workers?["list"]?.arrayValue?.filter { $0["state"]?.stringValue == "idle" }.count ?? 0
            return pool > 0 && idle == pool
        }
    }

    /// True once some worker is decoding.
    func waitUntilAWorkerIsBusy(timeout: Double = 10) -> Bool {
        waitForStatus(timeout: timeout) { status in
            status["workers"]?["list"]?.arrayValue?.contains { $0["state"]?.stringValue == "busy" } == true
        }
    }

    /// The skip log's records.
    func skipRecords() -> [JSONValue] {
        guard let text = try? String(contentsOfFile: skipLogPath, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { try? JSONValue.parse(Array($0.utf8)) }
    }
}

struct HarnessError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

extension SupervisorClient {
    /// Decodes one clip; returns the answer and the decoded block's bytes (validated) if any.
    func decode(_ path: String, _ options: [String: JSONValue] = [:], timeoutMs: Int32 = 60_000) throws -> (JSONValue, [UInt8]?) {
        var request = options
        request["op"] = "decode"
        if request["path"] == nil, !path.isEmpty { request["path"] = .string(path) }
        let (answer, fd) = try call(request, timeoutMs: timeoutMs)
        guard let fd else { return (answer, nil) }
        defer { try? fd.close() }
        #expect(SharedMemory.isSealed(fd), "the block is not sealed")
        let mapped = try MappedFile(fd: fd)
        _ = try BlockReader.validate(mapped.bytes)
        return (answer, Array(mapped.bytes))
    }
}

extension SupervisorClient {
    /// The supervisor's status once `condition` holds, or the last one after `seconds`.
    func status(within seconds: Double, until condition: (JSONValue) -> Bool) throws -> JSONValue {
        var status = JSONValue.null
        let until = Date().addingTimeInterval(seconds)
        repeat {
            status = try call(["op": "status"], timeoutMs: 5000).0["status"] ?? .null
            if condition(status) { break }
            usleep(50_000)
        } while Date() < until
        return status
    }
}

extension JSONValue {
    var errorReason: String? { self["error"]?["reason"]?.stringValue }
}
