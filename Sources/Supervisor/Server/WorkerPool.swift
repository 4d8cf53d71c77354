/// The decode workers the supervisor holds, and the start-up back-off.
///
/// Every count by state (live, ready, busy, idle) comes from `census`, so that dispatch, the
/// queue bound, readiness, `status` and systemd's STATUS= line can never disagree about the pool.
/// Spawning and the epoll registration stay with the supervisor's event loop; the pool only keeps
/// the books.
final class WorkerPool {
    /// How many workers are in each state.
    struct Census: Equatable {
        var starting = 0
        var idle = 0
        var busy = 0
        /// Busy workers that use no CPU (blocked in I/O): included in `busy`, but their slots
        /// are lent to other clips.
        var stalled = 0
        var retiring = 0
        var killed = 0

        /// Count toward the pool's size (a retiring or killed worker is already replaced).
        var live: Int { starting + idle + busy }
        /// Said `ready` and not yet leaving: they can take (or have taken) a clip.
        var ready: Int { idle + busy }
        /// Busy workers that hold a decode slot: those really on the CPU.
        var decoding: Int { busy - stalled }
        /// Processes, whatever their state: what the hard cap bounds.
        var processes: Int { live + retiring + killed }
    }

    private(set) var workers: [UInt64: WorkerProcess] = [:]
    /// Starts that failed in a row (exit before `ready`, start timeout, spawn error).
    private(set) var consecutiveStartFailures = 0
    /// No worker is spawned before this (the back-off after failed starts).
    private(set) var nextSpawnAllowed = Instant(nanoseconds: 0)
    /// Why the last start failed, for `status` and the refusal of clips when none can start.
    private(set) var lastStartError: String?

    /// Starts that must fail in a row, with no worker ready, before clips are refused at once
    /// (`overloaded`, `no_workers`) instead of waiting for the queue bound.
    static let failuresBeforeRefusing = 3

    subscript(id: UInt64) -> WorkerProcess? { workers[id] }

    var isEmpty: Bool { workers.isEmpty }

    /// Workers in a stable order (by id): status listings and dispatch do not depend on hashing.
    var ordered: [WorkerProcess] { workers.values.sorted { $0.id < $1.id } }

    var census: Census {
        var census = Census()
        for worker in workers.values {
            switch worker.state {
            case .starting: census.starting += 1
            case .idle: census.idle += 1
            case .busy:
                census.busy += 1
                if worker.isStalled { census.stalled += 1 }
            case .retiring: census.retiring += 1
            case .killed: census.killed += 1
            }
        }
        return census
    }

    /// Idle workers, oldest first.
    var idle: [WorkerProcess] {
        ordered.filter { if case .idle = $0.state { return true } else { return false } }
    }

    func insert(_ worker: WorkerProcess) {
        precondition(workers[worker.id] == nil, "worker \(worker.id) added twice")
        workers[worker.id] = worker
    }

    func remove(_ worker: WorkerProcess) {
        workers.removeValue(forKey: worker.id)
    }

    /// Workers to spawn now to hold `target` live ones without more than `cap` processes:
    /// none while the back-off runs.
    func spawnsNeeded(target: Int, cap: Int = .max, now: Instant) -> Int {
        guard now >= nextSpawnAllowed else { return 0 }
        let census = census
        return max(0, min(target - census.live, cap - census.processes))
    }

    /// A worker said `ready`: starts work again, and the back-off is lifted.
    func noteReady() {
        consecutiveStartFailures = 0
        nextSpawnAllowed = Instant(nanoseconds: 0)
    }

    /// A start failed: arms the back-off (100 ms doubling to 30 s, so a broken installation
    /// never makes the supervisor spin). Returns the delay in milliseconds.
    @discardableResult
    func noteStartFailure(_ reason: String, now: Instant) -> Int {
        consecutiveStartFailures += 1
        lastStartError = reason
        let delay = min(30_000, 100 << min(consecutiveStartFailures - 1, 9))
        nextSpawnAllowed = now.adding(milliseconds: delay)
        return delay
    }

    /// Whether starts keep failing with no worker ready: waiting will not help a clip.
    var cannotStartAny: Bool {
        consecutiveStartFailures >= Self.failuresBeforeRefusing && census.ready == 0
    }

    /// Warm when `target` workers have said `ready`, or, after failed starts, when at least one
    /// has (a degraded pool still serves).
    func isWarm(target: Int) -> Bool {
        let ready = census.ready
        return ready >= target || (ready > 0 && consecutiveStartFailures > 0)
    }
}
