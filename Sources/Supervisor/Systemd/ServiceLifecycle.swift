import Logging
import Shared

#if canImport(Glibc)
import Glibc
#endif

/// Tells systemd where the supervisor is in its life, from the event loop itself:
/// `READY=1` once the socket accepts and the pool is warm, `STATUS=` when the numbers change
/// (at most once a second), `WATCHDOG=1` every half `WATCHDOG_USEC`, and `STOPPING=1` as
/// soon as shutdown begins.
///
/// The watchdog ping is sent from `Supervisor.onTick`, which runs after every loop iteration
/// (the loop wakes at least once a second), so a wedged loop stops the pings and systemd
/// restarts the service. A ping therefore comes every half interval rounded up to the next
/// wake-up: keep `WatchdogSec=` at 5 s or more.
final class ServiceLifecycle {
    let notifier: SystemdNotifier
    let faults: ServiceFaults
    let logger: Logger
    /// At most one `STATUS=` per this many milliseconds.
    static let statusIntervalMs = 1000

    private let createdAt = Instant.now()
    private var lastPing: Instant?
    private var lastStatusAt: Instant?
    private var lastStatus: String?
    private var announcedStopping = false

    init(notifier: SystemdNotifier, faults: ServiceFaults, logger: Logger) {
        self.notifier = notifier
        self.faults = faults
        self.logger = logger
    }

    /// Hooks this object into the supervisor's loop (`onReady`, `onTick`). The supervisor keeps
    /// it alive through the closures; it holds no reference back.
    func attach(to supervisor: Supervisor) {
        supervisor.onReady = { [self] in ready($0) }
        supervisor.onTick = { [self] in tick($0) }
    }

    /// Something went wrong before the loop could run: tell the manager why in `STATUS=`.
    func startFailed(_ reason: String) {
        notifier.send("STATUS=\(SystemdNotifier.statusValue("cannot start: \(reason)"))")
    }

    func ready(_ supervisor: Supervisor) {
        let status = Self.statusLine(of: supervisor)
        notifier.send("READY=1\nMAINPID=\(getpid())\nSTATUS=\(SystemdNotifier.statusValue(status))")
        lastStatus = status
        lastStatusAt = Instant.now()
        logger.info("ready: \(status)")
    }

    func tick(_ supervisor: Supervisor) {
        let now = Instant.now()
        if let wedgeAfter = faults.wedgeLoopAfterMs, now.milliseconds(since: createdAt) >= wedgeAfter {
            Self.wedgeForever()
        }
        if let interval = notifier.watchdogPingIntervalNs,
            lastPing.map({ now.nanoseconds &- $0.nanoseconds >= interval }) ?? true
        {
            notifier.send("WATCHDOG=1")
            lastPing = now
        }
        if !announcedStopping, !Self.isRunning(supervisor) {
            announcedStopping = true
            let status = Self.statusLine(of: supervisor)
            notifier.send("STOPPING=1\nSTATUS=\(SystemdNotifier.statusValue(status))")
            lastStatus = status
            lastStatusAt = now
            return
        }
        guard notifier.isEnabled,
            lastStatusAt.map({ now.milliseconds(since: $0) >= Self.statusIntervalMs }) ?? true
        else { return }
        let status = Self.statusLine(of: supervisor)
        guard status != lastStatus else { return }
        notifier.send("STATUS=\(SystemdNotifier.statusValue(status))")
        lastStatus = status
        lastStatusAt = now
    }

    private static func isRunning(_ supervisor: Supervisor) -> Bool {
        if case .running = supervisor.phase { return true }
        return false
    }

    /// One line for `systemctl status`: the pool, the queue and what has been done.
    static func statusLine(of supervisor: Supervisor) -> String {
        var ready = 0
        var busy = 0
        for worker in supervisor.pool.workers.values {
            switch worker.state {
            case .idle: ready += 1
            case .busy:
                ready += 1
                busy += 1
            default: break
            }
        }
        let skipped = supervisor.counters.skipped.values.reduce(0, +)
        let work = "queue \(supervisor.queue.count), \(supervisor.counters.decoded) decoded, \(skipped) skipped"
        switch supervisor.phase {
        case .running where !supervisor.announcedReady:
            var line = "starting: \(ready)/\(supervisor.configuration.workers) workers ready"
            if let error = supervisor.pool.lastStartError { line += "; last start error: \(error)" }
            return line
        case .running:
            var line = "serving: \(ready)/\(supervisor.configuration.workers) workers (\(busy) busy), \(work)"
            if supervisor.pool.consecutiveStartFailures > 0, let error = supervisor.pool.lastStartError {
                line += "; workers fail to start: \(error)"
            }
            return line
        case .draining, .stopping, .finished:
            return "stopping: \(busy) clips in flight, \(supervisor.counters.decoded) decoded, \(skipped) skipped"
        }
    }

    /// The test-only `wedge-loop-after-ms` fault: the loop never comes back, as if stuck in a
    /// syscall, so the watchdog pings stop. SIGTERM is blocked (signalfd), so only SIGKILL ends it.
    private static func wedgeForever() -> Never {
        while true { sleep(3600) }
    }
}

/// Test-only switches for the supervisor itself, from `CLIPVISOR_TEST_FAULTS` (a comma list; the
/// worker reads the same variable and ignores entries it does not know, and so does this).
struct ServiceFaults: Equatable, Sendable {
    /// `wedge-loop-after-ms=N`: N ms after start, the event loop blocks forever.
    var wedgeLoopAfterMs: Int?

    static func fromEnvironment() -> ServiceFaults {
        SocketDiscovery.environment(WorkerMessage.faultEnvironmentKey).map(parse) ?? ServiceFaults()
    }

    static func parse(_ text: String) -> ServiceFaults {
        var faults = ServiceFaults()
        for item in text.split(separator: ",") {
            let parts = item.split(separator: "=", maxSplits: 1).map { $0.trimming(" ") }
            if parts.count == 2, parts[0] == "wedge-loop-after-ms", let ms = Int(parts[1]), ms >= 0 {
                faults.wedgeLoopAfterMs = ms
            }
        }
        return faults
    }
}
