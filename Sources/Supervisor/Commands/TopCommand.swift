import ArgumentParser
import CClipvisorShims
import Shared
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `clipvisor top`: a live view of the running supervisor, redrawn about once a second.
struct TopCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "top",
        abstract: "Watch the running supervisor live: workers, queue per client, throughput, recent skips.",
        discussion: """
            On a terminal it redraws every --interval seconds until you press q or Ctrl-C (the terminal \
            is restored either way). When standard output is not a terminal it prints plain-text \
            snapshots instead, one by default (--iterations for more), for logs and scripts; it \
            exits 1 when the last one found no supervisor.

            Everything shown comes from the `status` and `skips` operations; CPU% is the worker's \
            CPU time over the last refresh, and throughput counts clips answered and bytes delivered \
            per second over the same span.
            """)

    @OptionGroup var connection: ConnectionOptions

    @Option(help: ArgumentHelp("Seconds between refreshes (default: 1).", valueName: "seconds"))
    var interval: Double = 1

    @Option(help: "Snapshots to show before exiting (default: until q on a terminal, 1 otherwise).")
    var iterations: Int?

    func validate() throws {
        guard interval >= 0.1, interval <= 3600 else { throw ValidationError("--interval must be between 0.1 and 3600 seconds") }
        if let iterations, iterations < 1 { throw ValidationError("--iterations must be at least 1") }
    }

    func run() throws {
        let interactive = isatty(1) == 1 && isatty(0) == 1
        var source = TopSource(candidates: connection.candidates)
        var previous: TopSnapshot?
        let limit = iterations ?? (interactive ? Int.max : 1)
        if !interactive {
            for index in 0..<limit {
                if index > 0 { usleep(useconds_t(interval * 1_000_000)) }
                let snapshot = source.fetch()
                if index > 0 { print("") }
                print(TopView.render(snapshot, previous: previous, width: 200).joined(separator: "\n"))
                previous = snapshot
            }
            // Scripts and cron jobs learn from the exit status that nothing answered.
            if previous?.status == nil { throw ExitCode(1) }
            return
        }
        let terminal = RawTerminal()
        defer { terminal.restore() }
        var shown = 0
        while shown < limit {
            let snapshot = source.fetch()
            let (rows, columns) = terminal.size
            let lines = TopView.render(snapshot, previous: previous, width: columns)
            terminal.draw(Array(lines.prefix(max(1, rows - 1))) + ["q: quit"])
            previous = snapshot
            shown += 1
            if shown < limit, terminal.waitForQuit(seconds: interval) { break }
        }
    }
}

/// What one refresh fetched: the status, recent skips, and when (or why nothing came).
struct TopSnapshot {
    var status: JSONValue?
    var skips: [JSONValue] = []
    var error: String?
    var at = Instant.now()
}

/// Keeps one connection to the supervisor and reconnects when it goes away.
struct TopSource {
    let candidates: [String]
    private var client: SupervisorClient?

    init(candidates: [String]) { self.candidates = candidates }

    mutating func fetch() -> TopSnapshot {
        do {
            if client == nil { client = try SupervisorClient.connect(candidates: candidates, timeoutMs: 2000) }
            guard let client else { return TopSnapshot(error: "not connected") }
            let (status, _) = try client.call(["op": "status"], timeoutMs: 3000)
            let (skips, _) = try client.call(["op": "skips", "limit": 5], timeoutMs: 3000)
            return TopSnapshot(status: status["status"], skips: skips["skips"]?.arrayValue ?? [])
        } catch {
            client = nil
            return TopSnapshot(error: "\(error)")
        }
    }
}

/// The text of one frame, from two consecutive snapshots (rates need both).
enum TopView {
    static func render(_ snapshot: TopSnapshot, previous: TopSnapshot?, width: Int) -> [String] {
        guard let status = snapshot.status else {
            return ["clipvisor top: no supervisor answers (\(snapshot.error ?? "?")); retrying"]
        }
        let n = StatusReport.number
        var lines: [String] = []
        lines.append(
            "clipvisor \(status["version"]?.stringValue ?? "?")  pid \(n(status["pid"]))  \(status["phase"]?.stringValue ?? "?")  up \(duration(status["uptime_s"]?.doubleValue ?? 0))  \(status["socket"]?.stringValue ?? "")")

        let counters = status["counters"]
        let answered = answeredClips(counters)
        var rate = "throughput: -"
        if let before = previous?.status?["counters"], let previousAt = previous?.at {
            let seconds = max(0.001, snapshot.at.seconds(since: previousAt))
            let clips = (answered - answeredClips(before)) / seconds
            let delivered = ((counters?["bytes_out"]?.doubleValue ?? 0) - (before["bytes_out"]?.doubleValue ?? 0)) / seconds
            rate = "throughput: \(format(clips, 1)) clips/s, \(bytes(delivered))/s"
        }
        let skipped = (counters?["skipped"]?.objectValue ?? [:]).values.reduce(0) { $0 + ($1.doubleValue ?? 0) }
        lines.append("\(rate)   decoded \(n(counters?["decoded"])), probed \(n(counters?["probed"])), skipped \(n(.number(skipped)))")

        let queue = status["queue"]
        let memory = status["memory"]
        lines.append(
            "queue: \(n(queue?["length"])) waiting (limit \(n(queue?["limit"])))   clients \(n(status["connections"]))   blocks held \(bytes(memory?["block_bytes_held"]?.doubleValue ?? 0)) of \(bytes(memory?["budget"]?.doubleValue ?? 0))")

        let workers = status["workers"]
        let list = workers?["list"]?.arrayValue ?? []
        lines.append("")
        lines.append("workers: \(n(workers?["live"])) live, \(n(workers?["target"])) may decode, \(n(workers?["spare"])) spare")
        lines.append(pad("PID", 8) + pad("STATE", 10) + pad("CPU%", 7) + pad("CLIPS", 7) + pad("ELAPSED/DEADLINE", 18) + "CLIP")
        var previousCPU: [Double: Double] = [:]
        for worker in previous?.status?["workers"]?["list"]?.arrayValue ?? [] {
            if let pid = worker["pid"]?.doubleValue, let cpu = worker["cpu_s"]?.doubleValue { previousCPU[pid] = cpu }
        }
        for worker in list {
            let pid = worker["pid"]?.doubleValue ?? 0
            var cpu = "-"
            if let now = worker["cpu_s"]?.doubleValue, let before = previousCPU[pid], let previousAt = previous?.at {
                cpu = format(100 * (now - before) / max(0.001, snapshot.at.seconds(since: previousAt)), 0)
            }
            var elapsed = ""
            if let busy = worker["busy_ms"]?.doubleValue {
                elapsed = "\(format(busy / 1000, 1))/\(format((worker["deadline_ms"]?.doubleValue ?? 0) / 1000, 0)) s"
            }
            lines.append(
                pad(n(worker["pid"]), 8) + pad(worker["state"]?.stringValue ?? "?", 10) + pad(cpu, 7) + pad(n(worker["clips_done"]), 7)
                    + pad(elapsed, 18) + (worker["clip"]?.stringValue ?? ""))
        }

        let clients = status["clients"]?.arrayValue ?? []
        lines.append("")
        lines.append("clients: \(clients.count)")
        if !clients.isEmpty {
            lines.append(pad("PID", 8) + pad("UID", 8) + pad("QUEUED", 8) + "DECODING")
            for client in clients {
                lines.append(pad(n(client["pid"]), 8) + pad(n(client["uid"]), 8) + pad(n(client["queued"]), 8) + n(client["running"]))
            }
        }

        lines.append("")
        lines.append("recent skips:" + (snapshot.skips.isEmpty ? " none" : ""))
        for skip in snapshot.skips {
            let time = skip["ts"]?.stringValue.map { String($0.dropFirst(11).prefix(8)) } ?? ""
            lines.append("  \(time)  \(pad(skip["reason"]?.stringValue ?? "?", 14))\(skip["path"]?.stringValue ?? "?")")
        }
        return lines.map { clip(String($0.reversed().drop { $0 == " " }.reversed()), to: width) }
    }

    static func answeredClips(_ counters: JSONValue?) -> Double {
        let skipped = (counters?["skipped"]?.objectValue ?? [:]).values.reduce(0) { $0 + ($1.doubleValue ?? 0) }
        return (counters?["decoded"]?.doubleValue ?? 0) + (counters?["probed"]?.doubleValue ?? 0) + skipped
    }

    static func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count)
    }

    /// Long lines are cut at the terminal's width, keeping the end of a path visible.
    static func clip(_ line: String, to width: Int) -> String {
        guard width > 4, line.count > width else { return line }
        return String(line.prefix(width - 1)) + "…"
    }

    static func format(_ value: Double, _ decimals: Int) -> String {
        guard value.isFinite else { return "-" }
        var scale = 1.0
        for _ in 0..<decimals { scale *= 10 }
        let rounded = (value * scale).rounded() / scale
        return decimals == 0 ? String(Int(rounded)) : String(rounded)
    }

    static func bytes(_ value: Double) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var v = value
        var unit = 0
        while v >= 1024, unit < units.count - 1 {
            v /= 1024
            unit += 1
        }
        return "\(format(v, unit == 0 ? 0 : 1)) \(units[unit])"
    }

    static func duration(_ seconds: Double) -> String {
        let s = Int(seconds)
        if s < 60 { return "\(s)s" }
        if s < 3600 { return "\(s / 60)m\(s % 60)s" }
        return "\(s / 3600)h\((s % 3600) / 60)m"
    }
}

/// Quit requests from signal handlers (SIGINT, SIGTERM, SIGHUP) to the drawing loop.
private let quitRequested = Atomic<Bool>(false)

/// The terminal in non-canonical, no-echo mode on the alternate screen, restored exactly once
/// (on q, Ctrl-C, SIGTERM/SIGHUP, or an error).
final class RawTerminal {
    private var saved = termios()
    private var restored = false

    init() {
        tcgetattr(0, &saved)
        var raw = saved
        raw.c_lflag &= ~tcflag_t(ICANON | ECHO)
        withUnsafeMutableBytes(of: &raw.c_cc) { cc in
            cc[Int(VMIN)] = 0
            cc[Int(VTIME)] = 0
        }
        tcsetattr(0, TCSANOW, &raw)
        for sig in [SIGINT, SIGTERM, SIGHUP] {
            // No SA_RESTART: the handler must interrupt poll() so the loop sees the flag.
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { _ in quitRequested.store(true, ordering: .relaxed) }
            sigemptyset(&action.sa_mask)
            sigaction(sig, &action, nil)
        }
        write("\u{1B}[?1049h\u{1B}[?25l")
    }

    deinit { restore() }

    var size: (rows: Int, columns: Int) {
        var rows: Int32 = 0
        var columns: Int32 = 0
        guard cv_terminal_size(1, &rows, &columns) == 0, rows > 0, columns > 0 else { return (24, 80) }
        return (Int(rows), Int(columns))
    }

    func draw(_ lines: [String]) {
        write("\u{1B}[H\u{1B}[2J" + lines.joined(separator: "\r\n"))
    }

    /// Waits up to `seconds` for a key; true when the user asked to quit (q, Q, Ctrl-C) or
    /// a signal did.
    func waitForQuit(seconds: Double) -> Bool {
        let until = Instant.now().adding(milliseconds: Int(seconds * 1000))
        while !quitRequested.load(ordering: .relaxed) {
            let left = until.milliseconds(since: Instant.now())
            let now = Instant.now()
            guard now < until else { return false }
            var descriptor = pollfd(fd: 0, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, Int32(max(1, left)))
            guard ready > 0 else { continue }
            var byte: UInt8 = 0
            let n = Glibc.read(0, &byte, 1)
            if n == 0 { return true }  // the terminal went away
            if n == 1, [UInt8(ascii: "q"), UInt8(ascii: "Q"), 3].contains(byte) { return true }
        }
        return true
    }

    func restore() {
        guard !restored else { return }
        restored = true
        write("\u{1B}[?25h\u{1B}[?1049l")
        tcsetattr(0, TCSANOW, &saved)
    }

    private func write(_ text: String) {
        var bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Glibc.write(1, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { return }
            offset += n
        }
    }
}
