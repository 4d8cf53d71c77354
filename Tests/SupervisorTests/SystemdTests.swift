import Foundation
import Shared
import SystemPackage
import Testing

@testable import Supervisor

/// The systemd glue against real processes, without systemd as PID 1: sd_notify to a datagram
/// socket the test binds as NOTIFY_SOCKET, socket activation through systemd-socket-activate,
/// and journal entries caught on a socket bind-mounted over /run/systemd/journal/socket in a
/// private mount namespace.
@Suite(.serialized, .timeLimit(.minutes(2)))
final class SystemdTests {
    let fixtures = TemporaryDirectory("systemd")
    var goodClip: String { fixtures.file("good.mp4") }

    init() throws {
        try Fixtures.clip(at: goodClip, seconds: 1)
    }

    // MARK: - sd_notify

    @Test func readyOnlyWhenTheSocketAcceptsAndThePoolIsWarmThenStatusWatchdogAndStopping() throws {
        let directory = TemporaryDirectory("notify")
        let notify = try DatagramReceiver(path: directory.file("notify.sock"))
        let service = try ServiceProcess(
            directory: directory, arguments: ["--workers", "2", "--spare-workers", "0"],
            environment: ["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"])
        defer { service.kill() }

        let ready = try #require(notify.waitFor(timeout: 20) { $0.text.contains("READY=1") }, "no READY=1: \(service.stderr)")
        // At once: the socket answers and every worker is idle.
        let status = try SupervisorClient.connect(candidates: [service.socketPath], timeoutMs: 2000)
            .call(["op": "status"], timeoutMs: 2000).0["status"]
        let list = status?["workers"]?["list"]?.arrayValue ?? []
        #expect(list.count == 2 && list.allSatisfy { $0["state"]?.stringValue == "idle" }, "at READY: \(list)")
        #expect(ready.fields["MAINPID"] == String(service.pid))
        #expect(ready.fields["STATUS"]?.hasPrefix("serving: 2/2 workers") == true, "\(ready.text)")
        #expect(notify.messages.filter { $0.text.contains("READY=1") }.count == 1)

        // STATUS follows the work, at most about once a second.
        let client = try SupervisorClient.connect(candidates: [service.socketPath])
        #expect(try client.decode(goodClip).0["ok"]?.boolValue == true)
        _ = try client.decode(directory.file("missing.mp4"))
        let updated = notify.waitFor(timeout: 5) { $0.fields["STATUS"]?.contains("1 decoded, 1 skipped") == true }
        #expect(updated != nil, "STATUS updates: \(notify.messages.map(\.text))")
        // READY=1 and STOPPING=1 carry a STATUS at once; plain updates are rate-limited.
        let statusTimes = notify.messages.filter {
            $0.fields["STATUS"] != nil && $0.fields["READY"] == nil && $0.fields["STOPPING"] == nil
        }.map(\.time)
        for (a, b) in zip(statusTimes, statusTimes.dropFirst()) {
            #expect(b - a >= 0.95, "two STATUS updates \(b - a) s apart")
        }

        // WATCHDOG=1 every half WATCHDOG_USEC (1 s), rounded up to the loop's tick.
        _ = notify.waitFor(timeout: 4.5) { _ in false }
        let pings = notify.messages.filter { $0.text == "WATCHDOG=1" }.map(\.time).filter { $0 >= ready.time }
        #expect(pings.count >= 3, "pings: \(pings)")
        let intervals = zip(pings, pings.dropFirst()).map { $1 - $0 }
        #expect(intervals.allSatisfy { $0 >= 0.95 && $0 <= 2.1 }, "watchdog intervals \(intervals)")
        #expect(intervals.sorted()[intervals.count / 2] <= 1.3, "median watchdog interval \(intervals)")

        // SIGTERM: STOPPING=1 at once, then a clean exit.
        let before = notify.messages.count
        let signalled = monotonicSeconds()
        kill(service.pid, SIGTERM)
        let stopping = notify.waitFor(timeout: 5, after: before) { $0.text.contains("STOPPING=1") }
        #expect(stopping != nil && stopping!.time - signalled < 1.5, "STOPPING: \(notify.messages.map(\.text))")
        #expect(service.wait() == 0)
    }

    @Test func aWedgedLoopStopsTheWatchdogPings() throws {
        let directory = TemporaryDirectory("wedge")
        let notify = try DatagramReceiver(path: directory.file("notify.sock"))
        let started = monotonicSeconds()
        let service = try ServiceProcess(
            directory: directory, arguments: ["--workers", "1"],
            environment: [
                "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000",
                WorkerMessage.faultEnvironmentKey: "wedge-loop-after-ms=3000",
            ])
        defer { service.kill() }
        _ = notify.waitFor(timeout: 8) { _ in false }
        let windowEnd = monotonicSeconds() - started
        let pings = notify.messages.filter { $0.text == "WATCHDOG=1" }.map { $0.time - started }
        #expect(pings.count >= 2, "pings before the wedge: \(pings)")
        // The loop wedges at its first wake-up 3 s after start; after that the pings stop for
        // longer than the 2 s watchdog tolerates, which is what makes systemd act.
        #expect(windowEnd - (pings.last ?? 0) >= 3, "pings: \(pings) in \(windowEnd) s")
        #expect(service.isRunning, "the wedged supervisor must hang, not exit")
        // A wedged loop answers nobody: this is what systemd's watchdog is for.
        #expect((try? SupervisorClient.connect(candidates: [service.socketPath], timeoutMs: 500)) == nil)
    }

    @Test func aWatchdogMeantForAnotherProcessIsNotPinged() throws {
        let directory = TemporaryDirectory("wdpid")
        let notify = try DatagramReceiver(path: directory.file("notify.sock"))
        let service = try ServiceProcess(
            directory: directory, arguments: ["--workers", "1"],
            environment: ["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"])
        defer { service.kill() }
        #expect(notify.waitFor(timeout: 20) { $0.text.contains("READY=1") } != nil, "\(service.stderr)")
        _ = notify.waitFor(timeout: 2) { _ in false }
        #expect(!notify.messages.contains { $0.text.contains("WATCHDOG=1") }, "\(notify.messages.map(\.text))")
        kill(service.pid, SIGTERM)
        #expect(service.wait() == 0)
    }

    @Test func withoutNotifySocketNothingIsSentAndServingWorks() throws {
        let directory = TemporaryDirectory("nonotify")
        let service = try ServiceProcess(directory: directory, arguments: ["--workers", "1"], environment: [:])
        defer { service.kill() }
        let client = try service.waitUntilAccepting()
        #expect(try client.decode(goodClip).0["ok"]?.boolValue == true)
        kill(service.pid, SIGTERM)
        #expect(service.wait() == 0)
        #expect(service.stderr.contains("serving on"))
    }

    @Test func serviceFaultsParseTheirOwnSwitchAndIgnoreTheWorkers() {
        #expect(ServiceFaults.parse("crash-on=X, wedge-loop-after-ms=250 ,hang-on=Y").wedgeLoopAfterMs == 250)
        #expect(ServiceFaults.parse("crash-on=X").wedgeLoopAfterMs == nil)
        #expect(ServiceFaults.parse("wedge-loop-after-ms=soon").wedgeLoopAfterMs == nil)
    }

    // MARK: - Socket activation

    static let socketActivate = "/usr/bin/systemd-socket-activate"
    static var canUnshare: Bool { geteuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare") }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: socketActivate), "systemd-socket-activate is not installed"))
    func aSocketPassedBySystemdIsServedAndNeverUnlinked() throws {
        let activate = Self.socketActivate
        let directory = TemporaryDirectory("activate")
        let socketPath = directory.file("act.sock")
        let service = try ServiceProcess(
            directory: directory, executable: activate,
            arguments: ["-l", socketPath, Binaries.supervisor, "serve", "--skip-log", directory.file("skips.jsonl"), "--workers", "1"],
            environment: ["CLIPVISOR_SOCKET": directory.file("not-this-one.sock")], serve: false)
        defer { service.kill() }
        // systemd-socket-activate listens first and execs clipvisor on the first connection.
        // It binds (the file appears) before it listens: a connection in between is refused.
        let until = Date().addingTimeInterval(10)
        var connected: SupervisorClient?
        while connected == nil, Date() < until {
            connected = try? SupervisorClient.connect(candidates: [socketPath], timeoutMs: 10_000)
            if connected == nil { usleep(20_000) }
        }
        let client = try #require(connected, "\(service.stderr)")
        #expect(try client.decode(goodClip).0["ok"]?.boolValue == true)
        let status = try client.call(["op": "status"], timeoutMs: 5000).0["status"]
        #expect(status?["socket"]?.stringValue == socketPath)
        #expect(status?["pid"]?.intValue == Int(service.pid))
        #expect(!FileManager.default.fileExists(atPath: directory.file("not-this-one.sock")))

        kill(service.pid, SIGTERM)
        #expect(service.wait() == 0, "\(service.stderr)")
        var info = stat()
        #expect(lstat(socketPath, &info) == 0 && (info.st_mode & S_IFMT) == S_IFSOCK, "the passed socket was removed")
        #expect(service.stderr.contains("passed by systemd"), "\(service.stderr)")
    }

    // MARK: - journald

    @Test(.enabled(if: canUnshare, "needs root and unshare for a private mount namespace (CI runs the tests as root)"))
    func underJournaldASkipIsOneStructuredEntryAndNothingOnStderr() throws {
        let directory = TemporaryDirectory("journal")
        let journal = try DatagramReceiver(path: directory.file("journal.sock"))
        let stderrPath = directory.file("stderr.log")
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        var info = stat()
        try #require(stat(stderrPath, &info) == 0)
        let service = try ServiceProcess(
            directory: directory, executable: "/usr/bin/unshare",
            arguments: ["--mount", "--propagation", "private", "/bin/sh", "-c", Self.privateJournalScript, "sh", journal.path,
                        Binaries.supervisor, "serve", "--socket", directory.file("s.sock"),
                        "--skip-log", directory.file("skips.jsonl"), "--workers", "1"],
            // What systemd sets for StandardError=journal: the stream's device and inode.
            environment: ["JOURNAL_STREAM": "\(info.st_dev):\(info.st_ino)"], serve: false, stderrPath: stderrPath)
        defer { service.kill() }
        let client = try service.waitUntilAccepting()
        let missing = directory.file("no such clip.mp4")
        let (answer, _) = try client.decode(missing, ["tag": "sample-17", "deadline_ms": 4000])
        #expect(answer.errorReason == "not_found")

        let entry = try #require(journal.waitFor(timeout: 5) { $0.journal["SKIP_REASON"] != nil }, "no skip entry; stderr: \(service.stderr)").journal
        #expect(entry["SKIP_REASON"] == "not_found")
        #expect(entry["CLIP_PATH"] == missing)
        #expect(entry["TAG"] == "sample-17")
        #expect(entry["DEADLINE_MS"] == "4000")
        #expect(entry["ELAPSED_MS"].flatMap(Int.init) != nil, "\(entry)")
        #expect(entry["REQUEST_ID"].flatMap(Int.init) != nil, "\(entry)")
        #expect(entry["CLIENT_PID"] == String(getpid()))
        #expect(entry["CLIENT_UID"] == String(getuid()))
        #expect(entry["PRIORITY"] == "4")
        #expect(entry["SYSLOG_IDENTIFIER"] == "clipvisor")
        #expect(entry["MESSAGE_ID"] == SkipRecord.journalMessageID)
        #expect(entry["MESSAGE"]?.contains(missing) == true, "\(entry)")
        #expect(journal.messages.filter { $0.journal["SKIP_REASON"] != nil }.count == 1)

        // Lifecycle logs are structured too, with metadata as uppercase fields.
        let serving = journal.messages.first { $0.journal["MESSAGE"]?.contains("serving on") == true }?.journal
        #expect(serving?["PRIORITY"] == "6", "\(journal.messages.map(\.journal))")
        #expect(serving?["CODE_FILE"] != nil)

        kill(service.pid, SIGTERM)
        #expect(service.wait() == 0)
        #expect(journal.waitFor(timeout: 2) { $0.journal["MESSAGE"] == "stopped" } != nil)
        // Nothing twice: stderr (the journal's stream under systemd) stays empty.
        #expect(!service.stderr.contains("skipped") && !service.stderr.contains("serving on"), "stderr: \(service.stderr)")
        #expect(try String(contentsOfFile: directory.file("skips.jsonl"), encoding: .utf8).contains("not_found"))
    }

    @Test(.enabled(if: canUnshare, "needs root and unshare for a private mount namespace (CI runs the tests as root)"))
    func withTheJournalSocketButStderrElsewhereLogsStayOnStderr() throws {
        let directory = TemporaryDirectory("nojournal")
        let journal = try DatagramReceiver(path: directory.file("journal.sock"))
        let service = try ServiceProcess(
            directory: directory, executable: "/usr/bin/unshare",
            arguments: ["--mount", "--propagation", "private", "/bin/sh", "-c", Self.privateJournalScript, "sh", journal.path,
                        Binaries.supervisor, "serve", "--socket", directory.file("s.sock"),
                        "--skip-log", directory.file("skips.jsonl"), "--workers", "1"],
            // Inherited from a service whose stderr was redirected: not ours, so not trusted.
            environment: ["JOURNAL_STREAM": "1:2"], serve: false)
        defer { service.kill() }
        let client = try service.waitUntilAccepting()
        _ = try client.decode(directory.file("missing.mp4"))
        kill(service.pid, SIGTERM)
        #expect(service.wait() == 0)
        #expect(service.stderr.contains("skipped") && service.stderr.contains("serving on"), "stderr: \(service.stderr)")
        #expect(journal.messages.isEmpty, "\(journal.messages.map(\.journal))")
    }

    @Test func journalFieldNamesAndSkipFields() {
        #expect(Journal.fieldName("clip.path") == "CLIP_PATH")
        #expect(Journal.fieldName("worker.pid") == "WORKER_PID")
        #expect(Journal.fieldName("_trusted") == "TRUSTED")
        #expect(Journal.fieldName("9lives-x") == "LIVES_X")
        #expect(Journal.fieldName(String(repeating: "a", count: 80)).count == 64)
        var record = SkipRecord(path: "/d/x.mp4", reason: .timeout)
        record.elapsedMs = 5004
        record.deadlineMs = 5000
        record.requestID = 7
        record.clientPID = 42
        record.clientUID = 1000
        record.size = 123
        let fields = Dictionary(
            record.logMetadata.map { (Journal.fieldName($0.key), "\($0.value)") }, uniquingKeysWith: { a, _ in a })
        #expect(fields["SKIP_REASON"] == "timeout" && fields["CLIP_PATH"] == "/d/x.mp4")
        #expect(fields["ELAPSED_MS"] == "5004" && fields["DEADLINE_MS"] == "5000" && fields["REQUEST_ID"] == "7")
        #expect(fields["CLIENT_PID"] == "42" && fields["CLIENT_UID"] == "1000" && fields["CLIP_SIZE"] == "123")
        #expect(fields["TAG"] == nil)
    }

    /// Runs `$2...` in the private mount namespace with `$1` (a datagram socket the test bound)
    /// mounted over /run/systemd/journal/socket, where sd_journal_sendv sends.
    static let privateJournalScript = """
        set -e
        j=/run/systemd/journal
        if [ -d "$j" ]; then mount -t tmpfs -o mode=0755 tmpfs "$j"
        elif [ -d /run/systemd ]; then mount -t tmpfs -o mode=0755 tmpfs /run/systemd; mkdir -p "$j"
        else mount -t tmpfs -o mode=0755 tmpfs /run; mkdir -p "$j"; fi
        : > "$j/socket"
        mount --bind "$1" "$j/socket"
        shift
        exec "$@"
        """
}

/// Seconds on the monotonic clock.
func monotonicSeconds() -> Double {
    Double(Instant.now().nanoseconds) / 1e9
}

/// A datagram socket the test binds (NOTIFY_SOCKET, or the journal's socket) and the messages
/// that arrive on it, each with its arrival time.
final class DatagramReceiver {
    struct Message {
        var time: Double
        var bytes: [UInt8]
        var text: String { String(decoding: bytes, as: UTF8.self) }
        /// `KEY=value` lines (sd_notify).
        var fields: [String: String] {
            var out: [String: String] = [:]
            for line in text.split(separator: "\n") {
                let parts = line.split(separator: "=", maxSplits: 1)
                if parts.count == 2 { out[String(parts[0])] = String(parts[1]) }
            }
            return out
        }
        /// journald's native protocol: `KEY=value\n`, or `KEY\n` + 64-bit LE length + bytes + `\n`.
        var journal: [String: String] { DatagramReceiver.parseJournal(bytes) }
    }

    let path: String
    let fd: FileDescriptor
    private(set) var messages: [Message] = []

    init(path: String) throws {
        self.path = path
        let raw = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard raw >= 0 else { throw Errno(rawValue: errno) }
        fd = FileDescriptor(rawValue: raw)
        var (address, length) = try UnixSocket.address(path)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(raw, $0, length) }
        }
        guard rc == 0 else { throw Errno(rawValue: errno) }
        chmod(path, 0o666)
        var size: Int32 = 8 << 20
        setsockopt(raw, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { try? fd.close() }

    /// Receives until a message after index `after` satisfies `match` (returned) or `timeout`
    /// seconds pass (nil). Every message received is kept in `messages`.
    @discardableResult
    func waitFor(timeout: Double, after: Int = 0, _ match: (Message) -> Bool) -> Message? {
        if let found = messages.dropFirst(after).first(where: match) { return found }
        let until = monotonicSeconds() + timeout
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let left = until - monotonicSeconds()
            guard left > 0, (try? SocketIO.waitReadable(fd, timeoutMs: Int32(left * 1000) + 1)) == true else { return nil }
            guard let received = try? buffer.withUnsafeMutableBytes({ raw throws(Errno) in
                try SocketIO.receive(fd, into: raw, nonBlocking: true)
            }) else { continue }
            var bytes = Array(buffer[0..<received.count])
            if let passed = received.fd {
                // A large journal entry comes as a sealed memfd (sd_journal_sendv's fallback).
                bytes = Self.readAll(passed)
                try? passed.close()
            }
            let message = Message(time: monotonicSeconds(), bytes: bytes)
            messages.append(message)
            if messages.count > after, match(message) { return message }
        }
    }

    private static func readAll(_ fd: FileDescriptor) -> [UInt8] {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65_536)
        var offset: off_t = 0
        while true {
            let n = chunk.withUnsafeMutableBytes { pread(fd.rawValue, $0.baseAddress, $0.count, offset) }
            guard n > 0 else { break }
            out.append(contentsOf: chunk[0..<n])
            offset += off_t(n)
        }
        return out
    }

    static func parseJournal(_ bytes: [UInt8]) -> [String: String] {
        var fields: [String: String] = [:]
        var index = 0
        while index < bytes.count {
            guard let end = bytes[index...].firstIndex(where: { $0 == UInt8(ascii: "=") || $0 == UInt8(ascii: "\n") }) else { break }
            let name = String(decoding: bytes[index..<end], as: UTF8.self)
            if bytes[end] == UInt8(ascii: "=") {
                let lineEnd = bytes[(end + 1)...].firstIndex(of: UInt8(ascii: "\n")) ?? bytes.count
                fields[name] = String(decoding: bytes[(end + 1)..<lineEnd], as: UTF8.self)
                index = lineEnd + 1
            } else {
                guard end + 9 <= bytes.count else { break }
                var length = 0
                for k in 0..<8 { length |= Int(bytes[end + 1 + k]) << (8 * k) }
                let start = end + 9
                guard start + length <= bytes.count else { break }
                fields[name] = String(decoding: bytes[start..<(start + length)], as: UTF8.self)
                index = start + length + 1
            }
        }
        return fields
    }
}

/// A `clipvisor serve` (or a wrapper that execs it) with a clean systemd environment, its
/// stderr in a file, not waited for: the tests decide what "ready" means.
final class ServiceProcess {
    let process = Process()
    let socketPath: String
    let stderrPath: String

    /// With `serve`, runs `clipvisor serve --socket DIR/s.sock --skip-log DIR/skips.jsonl ARGUMENTS`;
    /// otherwise `executable ARGUMENTS` as given.
    init(
        directory: TemporaryDirectory, executable: String = Binaries.supervisor, arguments: [String],
        environment: [String: String], serve: Bool = true, stderrPath: String? = nil
    ) throws {
        socketPath = directory.file("s.sock")
        self.stderrPath = stderrPath ?? directory.file("stderr-\(UInt32.random(in: 0...UInt32.max)).log")
        if stderrPath == nil { _ = FileManager.default.createFile(atPath: self.stderrPath, contents: nil) }
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = serve
            ? ["serve", "--socket", socketPath, "--skip-log", directory.file("skips.jsonl")] + arguments : arguments
        var env = ProcessInfo.processInfo.environment
        for key in [
            "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
            "JOURNAL_STREAM", "CLIPVISOR_SOCKET", WorkerMessage.faultEnvironmentKey,
        ] {
            env.removeValue(forKey: key)
        }
        for (key, value) in environment { env[key] = value }
        process.environment = env
        process.standardError = FileHandle(forWritingAtPath: self.stderrPath)
        process.standardOutput = FileHandle.nullDevice
        try process.run()
    }

    var pid: pid_t { process.processIdentifier }
    var isRunning: Bool { process.isRunning }
    var stderr: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    /// A client once the socket answers `hello` and a worker is idle.
    func waitUntilAccepting(timeout: Double = 20) throws -> SupervisorClient {
        let until = Date().addingTimeInterval(timeout)
        while Date() < until {
            if let client = try? SupervisorClient.connect(candidates: [socketPath], timeoutMs: 1000),
                let status = try? client.call(["op": "status"], timeoutMs: 2000).0["status"],
                status["workers"]?["list"]?.arrayValue?.contains(where: { $0["state"]?.stringValue == "idle" }) == true
            {
                return client
            }
            guard process.isRunning else { throw HarnessError("exited: \(stderr)") }
            usleep(50_000)
        }
        throw HarnessError("not accepting within \(timeout) s: \(stderr)")
    }

    /// Waits for the exit; returns the status.
    func wait() -> Int32 {
        process.waitUntilExit()
        return process.terminationStatus
    }

    func kill() {
        if process.isRunning {
            Glibc.kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    deinit { kill() }
}
