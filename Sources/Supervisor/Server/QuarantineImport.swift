import Logging
import Shared
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Quarantine learnt from other nodes: a merged skip ledger on shared storage
/// (`serve --quarantine-import PATH`, typically `clipvisor skips --merge ... --json` written by a
/// cron job), so a clip that hung or crashed a worker on one node is answered `quarantined` at
/// once on every node, instead of costing each node its deadline again.
///
/// The file lives on shared storage, whose `stat` or `read` can hang (a dead NFS server), and the
/// supervisor's event loop must never hang: a dedicated thread watches the file (every
/// `pollInterval`, or at once after `requestReload()`, which SIGHUP calls), parses it and swaps
/// the table in under a mutex; the loop only looks entries up. A missing or unreadable file
/// keeps the last table and is reported in `status`.
final class QuarantineImport: Sendable {
    let path: String
    let policy: QuarantinePolicy
    let pollIntervalMs: Int
    private let logger: Logger

    private struct State {
        var entries: [String: QuarantineEntry] = [:]
        var problem: String?
        /// Device, inode, size and mtime (ns) of the file last read.
        var identity: [Int64]?
        var loads = 0
        var loadedAtMs: Int64?
        var reloadRequested = true
        var stopped = false
    }

    private let state = Mutex(State())

    init(path: String, policy: QuarantinePolicy, logger: Logger, pollIntervalMs: Int = 2000) {
        self.path = path
        self.policy = policy
        self.logger = logger
        self.pollIntervalMs = pollIntervalMs
    }

    /// Starts the watching thread (pthread_create: it blocks in stat/read, so never on the loop
    /// or the cooperative pool). Its first load runs at once.
    func start() {
        let box = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let me = Unmanaged<QuarantineImport>.fromOpaque(raw!).takeRetainedValue()
            me.watch()
            return nil
        }, box)
        if rc == 0 {
            pthread_detach(thread)
        } else {
            Unmanaged<QuarantineImport>.fromOpaque(box).release()
            logger.error("cannot start the quarantine import thread for \(path): \(Errno(rawValue: rc))")
        }
    }

    /// Re-read the file now, changed or not (SIGHUP).
    func requestReload() { state.withLock { $0.reloadRequested = true } }

    func stop() { state.withLock { $0.stopped = true } }

    /// The imported quarantine entry for `path`, if it is still live.
    func entry(for path: String) -> QuarantineEntry? {
        let now = Timestamp.nowMilliseconds()
        return state.withLock { state in
            guard let entry = state.entries[path], now - entry.sinceMs < policy.expiryMs else { return nil }
            return entry
        }
    }

    var statusJSON: JSONValue {
        state.withLock { state in
            [
                "path": .string(path), "entries": .number(Double(state.entries.count)), "loads": .number(Double(state.loads)),
                "loaded_at": state.loadedAtMs.map { .string(Timestamp.rfc3339(milliseconds: $0)) } ?? .null,
                "problem": state.problem.map { .string($0) } ?? .null,
            ]
        }
    }

    // MARK: - The watching thread

    private func watch() {
        var sinceCheckMs = Int.max
        while true {
            let (stopped, forced) = state.withLock { state in
                defer { state.reloadRequested = false }
                return (state.stopped, state.reloadRequested)
            }
            if stopped { return }
            if forced || sinceCheckMs >= pollIntervalMs {
                check(force: forced)
                sinceCheckMs = 0
            }
            usleep(100_000)
            sinceCheckMs += 100
        }
    }

    private func check(force: Bool) {
        var info = stat()
        guard stat(path, &info) == 0 else {
            let code = errno
            let problem = "cannot read the quarantine import \(path): \(Errno(rawValue: code))"
            let changed = state.withLock { state in
                defer { state.problem = problem; state.identity = nil }
                return state.problem != problem
            }
            let kept = state.withLock { $0.entries.count }
            // A ledger not gathered yet is normal on a fresh node; anything else is worth a warning.
            if changed, code == ENOENT, kept == 0 {
                logger.info("\(problem); nothing imported until it appears")
            } else if changed {
                logger.warning("\(problem); keeping the \(kept) entries read before")
            }
            return
        }
        let identity = [
            Int64(info.st_dev), Int64(info.st_ino), Int64(info.st_size),
            Int64(info.st_mtim.tv_sec) * 1_000_000_000 + Int64(info.st_mtim.tv_nsec),
        ]
        if !force, state.withLock({ $0.identity == identity }) { return }
        guard let bytes = Filesystem.read(path) else {
            state.withLock { $0.problem = "cannot read the quarantine import \(path): \(Errno(rawValue: errno))" }
            return
        }
        let entries = Self.parse(bytes, policy: policy, now: Timestamp.nowMilliseconds())
        state.withLock { state in
            state.entries = entries
            state.identity = identity
            state.problem = nil
            state.loads += 1
            state.loadedAtMs = Timestamp.nowMilliseconds()
        }
        logger.info("quarantine import \(path): \(entries.count) clips quarantined by other nodes")
    }

    // MARK: - Parsing

    /// The quarantine a ledger implies, by the local rules: a file that crashed or ran out of memory
    /// anywhere is quarantined; one that timed out is quarantined once its timeouts on all nodes
    /// together reach `timeoutsToQuarantine`. Lines are skip-log records or merged entries of
    /// `skips --merge --json` (whose `reasons` carry the counts); a `forget` line lifts a path.
    /// Entries older than the expiry (from their newest skip) are left out.
    static func parse(_ bytes: [UInt8], policy: QuarantinePolicy, now: Int64) -> [String: QuarantineEntry] {
        struct Key: Hashable {
            var path: String
            var size: Int64?
            var mtime: Double?
        }
        struct Tally {
            var crashes: [SkipReason: Int] = [:]
            var timeouts = 0
            var lastMs: Int64 = .min
        }
        var lines: [(record: SkipRecord, reasons: [SkipReason: Int])] = []
        for line in bytes.split(separator: UInt8(ascii: "\n")) where !line.isEmpty {
            guard let value = try? JSONValue.parse(line), let record = SkipRecord(json: value) else { continue }
            var reasons: [SkipReason: Int] = [:]
            if case .object(let fields)? = value["reasons"] {
                for (name, count) in fields {
                    if let reason = SkipReason(rawValue: name), let n = count.intValue { reasons[reason] = n }
                }
            } else if let reason = record.reason {
                reasons[reason] = 1
            }
            lines.append((record, reasons))
        }
        var tallies: [Key: Tally] = [:]
        for (record, reasons) in lines.sorted(by: { $0.record.timestampMs < $1.record.timestampMs }) {
            if record.event == .forget {
                if let path = record.path { tallies = tallies.filter { $0.key.path != path } } else { tallies = [:] }
                continue
            }
            guard let path = record.path else { continue }
            let key = Key(path: path, size: record.size, mtime: record.mtime)
            var tally = tallies[key] ?? Tally()
            for (reason, n) in reasons {
                switch reason {
                case .crashed, .outOfMemory: tally.crashes[reason, default: 0] += n
                case .timeout: tally.timeouts += n
                default: break
                }
            }
            tally.lastMs = max(tally.lastMs, record.timestampMs)
            tallies[key] = tally
        }
        var out: [String: QuarantineEntry] = [:]
        for (key, tally) in tallies where now - tally.lastMs < policy.expiryMs {
            let reason: SkipReason
            if let crash = tally.crashes.max(by: { $0.value < $1.value })?.key {
                reason = crash
            } else if tally.timeouts >= policy.timeoutsToQuarantine {
                reason = .timeout
            } else {
                continue
            }
            // One version per path: the newest (the worker compares it with the file as it is now).
            if let existing = out[key.path], existing.sinceMs >= tally.lastMs { continue }
            out[key.path] = QuarantineEntry(
                size: key.size, mtime: key.mtime, reason: reason, sinceMs: tally.lastMs, timeouts: tally.timeouts,
                isQuarantined: true)
        }
        return out
    }
}
