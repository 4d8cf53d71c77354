import CClipvisorShims
import ArgumentParser
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Options every client command shares.
struct ConnectionOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Supervisor socket (default: $CLIPVISOR_SOCKET, /run/clipvisor/clipvisor.sock, then the per-user socket).", valueName: "path"))
    var socket: String?

    var candidates: [String] { socket.map { [$0] } ?? SocketDiscovery.clientCandidates }
}

/// The choice, for commands that can start an embedded supervisor, to do so even when the
/// system service's socket refuses this user.
struct PrivateFallbackOption: ParsableArguments {
    @Flag(name: .customLong("private"), help: ArgumentHelp(
        "When the system service's socket refuses this user (not in its group), start a private supervisor for this call instead (also $CLIPVISOR_PRIVATE=1). It bypasses the service's data roots, quarantine and skip log."))
    var enabled = false
}

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show the running supervisor's workers, queue and counters.")

    @OptionGroup var connection: ConnectionOptions

    @Flag(help: "Print the status as JSON.")
    var json = false

    func run() throws {
        let client = try SupervisorClient.connect(candidates: connection.candidates)
        let (answer, _) = try client.call(["op": "status"], timeoutMs: 5000)
        guard answer["ok"]?.boolValue == true, let status = answer["status"] else {
            throw CleanExit.message("clipvisor: \(answer["error"]?["message"]?.stringValue ?? "status failed")")
        }
        if json {
            print(status.jsonString)
            return
        }
        print(StatusReport.render(status))
    }
}

/// Human-readable `clipvisor status`.
enum StatusReport {
    static func number(_ value: JSONValue?) -> String {
        guard let n = value?.doubleValue else { return "-" }
        return JSONValue.format(n)
    }

    /// How workers start: "cloned by the fork server pid N (M so far)", or why they are exec'd.
    static func workerStartLine(_ start: JSONValue) -> String? {
        guard let mode = start["mode"]?.stringValue else { return nil }
        if let problem = start["problem"]?.stringValue {
            return "  started with exec for now: \(problem); the fork server is tried again at the first worker start 30 s after it failed"
        }
        guard mode == "fork-server", let pid = start["fork_server_pid"]?.intValue else {
            return "  started with exec (worker_start = \"\(mode)\")"
        }
        return "  cloned by the fork server, pid \(pid) (\(number(start["forks"])) so far)"
    }

    static func render(_ status: JSONValue) -> String {
        var lines: [String] = []
        lines.append(
            "clipvisor \(status["version"]?.stringValue ?? "?") pid \(number(status["pid"])), \(status["phase"]?.stringValue ?? "?"), up \(number(status["uptime_s"])) s, socket \(status["socket"]?.stringValue ?? "?")")
        let workers = status["workers"]
        lines.append(
            "workers: \(number(workers?["live"])) live (\(number(workers?["target"])) decoding at most, \(number(workers?["spare"])) spare, at most \(number(workers?["max"])) processes), recycled after \(number(workers?["clips_per_worker"])) clips")
        if let stalled = workers?["stalled"]?.intValue, stalled > 0 {
            lines.append("  \(stalled) blocked in I/O (no CPU): their slots are lent to other clips until they resume or reach their deadline")
        }
        if let error = workers?["last_start_error"]?.stringValue {
            lines.append("  last start failure: \(error) (\(number(workers?["consecutive_start_failures"])) in a row)")
        }
        if let start = workers?["start"], let line = workerStartLine(start) { lines.append(line) }
        if let sandbox = status["sandbox"], let line = sandboxLine(sandbox) { lines.append(line) }
        for worker in workers?["list"]?.arrayValue ?? [] {
            var line = "  pid \(number(worker["pid"]))  \(worker["state"]?.stringValue ?? "?")  clips \(number(worker["clips_done"]))"
            if let refused = worker["refused_media"]?.stringValue { line += "  (stayed after refusing \(refused))" }
            if let clip = worker["clip"]?.stringValue {
                line += "  \(clip) (\(number(worker["busy_ms"])) of \(number(worker["deadline_ms"])) ms, \(number(worker["cpu_s"])) CPU-s"
                line += worker["stalled"]?.boolValue == true ? ", BLOCKED: slot lent)" : ")"
            }
            lines.append(line)
        }
        if let pages = status["memory"]?["block_pages"], let line = BlockPages.line(pages) { lines.append(line) }
        if let slabs = status["memory"]?["slabs"] {
            let mib = { (value: JSONValue?) in String(format: "%.1f", (value?.doubleValue ?? 0) / 1_048_576) }
            lines.append(
                slabs["per_connection"]?.intValue == 0
                    ? "block slabs: off (block_slabs = 0: every block is a fresh memfd)"
                    : "block slabs: \(number(slabs["count"])) holding \(mib(slabs["bytes"])) MiB of \(mib(slabs["limit"])) MiB, up to \(number(slabs["per_connection"])) per connection")
        }
        let queue = status["queue"]
        lines.append("queue: \(number(queue?["length"])) waiting (limit \(number(queue?["limit"])), wait bound \(number(queue?["wait_limit_ms"])) ms)")
        let counters = status["counters"]
        lines.append(
            "decoded \(number(counters?["decoded"])), probed \(number(counters?["probed"])), timeouts \(number(counters?["timeouts"])), crashes \(number(counters?["crashes"])) (\(number(counters?["crash_retries"])) retried on a fresh worker), recycles \(number(counters?["recycles"])), spawn failures \(number(counters?["spawn_failures"])), bytes out \(number(counters?["bytes_out"]))")
        if let skipped = counters?["skipped"]?.objectValue {
            let nonzero = skipped.filter { ($0.value.doubleValue ?? 0) > 0 }.sorted { $0.key < $1.key }
            lines.append("skipped: " + (nonzero.isEmpty ? "none" : nonzero.map { "\($0.key) \(number($0.value))" }.joined(separator: ", ")))
        }
        if let log = status["skip_log"], log != .null {
            let health = log["healthy"]?.boolValue == true ? "ok" : "NOT WRITABLE: \(log["problem"]?.stringValue ?? "?")"
            lines.append("skip log: \(log["path"]?.stringValue ?? "?") (\(health)), \(number(log["quarantined"])) quarantined")
        }
        var metrics: [String] = []
        if let listen = status["metrics"]?["listen"]?.stringValue { metrics.append("http://\(listen)/metrics") }
        if let file = status["metrics"]?["textfile"]?.stringValue { metrics.append("textfile \(file)") }
        lines.append("metrics: " + (metrics.isEmpty ? "`clipvisor metrics` (no listener or textfile configured)" : metrics.joined(separator: ", ")))
        return lines.joined(separator: "\n")
    }
}

extension StatusReport {
    /// The workers' sandbox layers; loud when the Landlock write ban is missing.
    static func sandboxLine(_ sandbox: JSONValue) -> String? {
        let mode = sandbox["landlock_mode"]?.stringValue ?? "?"
        guard let abi = sandbox["landlock_abi"]?.intValue else { return nil }
        if abi > 0 { return "sandbox: Landlock write ban in force (ABI \(abi)), no_new_privs, resource limits" }
        let why = sandbox["problem"]?.stringValue ?? "unknown"
        return "sandbox: workers run WITHOUT the Landlock write ban (sandbox = \(mode)): \(why); no_new_privs and resource limits in force"
    }
}

/// A supervisor started for one CLI call when none answers, stopped when the call is done.
final class EmbeddedSupervisor {
    let pid: pid_t
    let socketPath: String
    let directory: String

    init(extraArguments: [String] = []) throws {
        let template = "/tmp/clipvisor-embedded-XXXXXX"
        var buffer = Array(template.utf8CString)
        guard let made = mkdtemp(&buffer) else { throw SupervisorClient.Failure("mkdtemp failed: \(Errno(rawValue: errno))") }
        directory = String(cString: made)
        socketPath = "\(directory)/clipvisor.sock"
        let executable = ServeConfiguration.siblingWorker().replacingSuffix("clipvisor-worker", with: "clipvisor")
        switch Spawn.start(executable, ["serve", "--socket", socketPath, "--log-level", "warning"] + extraArguments) {
        case .success(let child): pid = child
        case .failure(let error): throw SupervisorClient.Failure("cannot start an embedded supervisor: \(error)")
        }
    }

    /// Connects once the embedded supervisor accepts (within `timeoutMs`).
    func connect(timeoutMs: Int) throws -> SupervisorClient {
        let until = Instant.now().adding(milliseconds: timeoutMs)
        while true {
            if let client = try? SupervisorClient.connect(candidates: [socketPath], timeoutMs: 2000) { return client }
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                throw SupervisorClient.Failure("the embedded supervisor exited during start-up (status \(status))")
            }
            guard Instant.now() < until else { throw SupervisorClient.Failure("the embedded supervisor did not start within \(timeoutMs) ms") }
            usleep(20_000)
        }
    }

    func stop() {
        kill(pid, SIGTERM)
        var status: Int32 = 0
        let until = Instant.now().adding(milliseconds: 15_000)
        while waitpid(pid, &status, WNOHANG) == 0 {
            if Instant.now() > until {
                kill(pid, SIGKILL)
                waitpid(pid, &status, 0)
                break
            }
            usleep(10_000)
        }
        rmdir(directory)
    }
}

extension String {
    func replacingSuffix(_ suffix: String, with replacement: String) -> String {
        hasSuffix(suffix) ? String(dropLast(suffix.count)) + replacement : self
    }
}

/// Connects to a running supervisor, or starts an embedded one for this call.
/// When the system service's socket exists but refuses this user, that is the answer (join the
/// group), unless `allowPrivate` or `$CLIPVISOR_PRIVATE` chose a private supervisor.
func connectOrEmbed(_ connection: ConnectionOptions, allowPrivate: Bool = false, quiet: Bool) throws -> (SupervisorClient, EmbeddedSupervisor?) {
    do {
        return (try SupervisorClient.connect(candidates: connection.candidates), nil)
    } catch {
        if connection.socket != nil { throw error }
        if !allowPrivate, !SocketDiscovery.privateFallbackChosen,
            let refused = SocketDiscovery.permissionProblem(SocketDiscovery.systemSocket)
        {
            throw SupervisorClient.Failure("\(refused); or pass --private (or set CLIPVISOR_PRIVATE=1) to start a private supervisor for this call")
        }
        if !quiet {
            FileOutput.standardError("clipvisor: no supervisor is running; starting one for this call\n")
        }
        let embedded = try EmbeddedSupervisor(extraArguments: ["--workers", "1"])
        do {
            return (try embedded.connect(timeoutMs: 15_000), embedded)
        } catch {
            embedded.stop()
            throw error
        }
    }
}

/// Writes to fd 2 (the Glibc `stderr` global is not usable outside main.swift in Swift 6).
enum FileOutput {
    static func standardError(_ text: String) {
        var bytes = Array(text.utf8)
        _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
    }
}

/// An absolute form of a path given on the command line.
func absolutePath(_ path: String) -> String {
    if path.hasPrefix("/") { return path }
    var buffer = [CChar](repeating: 0, count: 4096)
    guard getcwd(&buffer, buffer.count) != nil else { return path }
    let cwd = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return cwd == "/" ? "/\(path)" : "\(cwd)/\(path)"
}
