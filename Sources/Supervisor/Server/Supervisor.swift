import CClipvisorShims
import Logging
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The supervisor: one thread, one epoll loop, every state change in response to an event —
/// a client message, a worker message, a worker exit, a signal, or a deadline.
///
/// It never touches media. The only way it can learn about a clip is from a worker, and a
/// worker that does not answer in time is killed; so nothing a clip does can stall this loop.
final class Supervisor {
    enum Phase {
        case running
        /// SIGTERM/SIGINT seen: no new work; clips in flight may finish until `graceEnd`.
        case draining(graceEnd: Instant)
        /// Workers told to exit; waiting for them (SIGKILL at `killAt`) and for outboxes to flush.
        case stopping(killAt: Instant, giveUpAt: Instant)
        case finished
    }

    let configuration: ServeConfiguration
    let logger: Logger
    let poller: Poller
    let spawner: WorkerSpawner
    private(set) var listener: FileDescriptor?
    /// Whether we created the socket file (and so remove it at exit; never one systemd passed).
    let ownsSocketFile: Bool
    /// Device and inode of the socket file this supervisor bound: at exit only that file is
    /// removed, never one a newer supervisor has bound at the same path since.
    private let socketFileIdentity: [UInt64]?

    private static func fileIdentity(_ path: String) -> [UInt64]? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return [UInt64(info.st_dev), UInt64(info.st_ino)]
    }
    let signals: FileDescriptor
    let startedAt = Instant.now()

    var phase: Phase = .running
    var connections: [UInt64: Connection] = [:]
    /// The decode workers and the start-up back-off.
    let pool = WorkerPool()
    /// Every clip accepted and not yet answered, queued or running.
    var jobs: [JobID: ClipJob] = [:]
    /// Clips waiting for a worker, one lane per client, served round-robin.
    var queue = JobQueue()
    /// Clips whose worker crashed after refusing bad media (`ClipJob.crashRetry`), oldest first:
    /// they wait outside `queue` for a worker that never refused media.
    var crashRetries: [JobID] = []
    var counters = Counters()
    /// The connections' block slabs (docs/protocol.md, "Block slabs").
    let slabs: BlockSlabs
    /// Prometheus metrics: recorded here, read by the scrape threads (Metrics/).
    let metrics = SupervisorMetrics()
    var metricsQuarantineRefreshed = Instant(nanoseconds: 0)
    /// Where metrics are served (`http://127.0.0.1:9464/metrics`) and written, for `status`.
    var metricsEndpoints: [String: JSONValue] = [:]
    var nextID: UInt64 = 1
    /// The Landlock state the newest ready worker reported; nil before any was ready.
    var workerLandlock: (abi: Int, problem: String?)?
    var listenerPausedUntil: Instant?
    /// Called after every loop iteration (systemd watchdog, status updates).
    var onTick: ((Supervisor) -> Void)?
    /// Called once when the listener accepts and the pool is warm (systemd READY=1).
    var onReady: ((Supervisor) -> Void)?
    var announcedReady = false
    /// Quarantine learnt from other nodes (`serve --quarantine-import`), consulted after the local one.
    var quarantineImport: QuarantineImport?
    var receiveBuffer = [UInt8](repeating: 0, count: WorkerMessage.maxSize)
    let skipLog: SkipLog?

    init(
        configuration: ServeConfiguration, listener: FileDescriptor, ownsSocketFile: Bool,
        skipLog: SkipLog?, logger: Logger
    ) throws {
        self.configuration = configuration
        self.logger = logger
        self.listener = listener
        self.ownsSocketFile = ownsSocketFile
        self.socketFileIdentity = ownsSocketFile ? Self.fileIdentity(configuration.socketPath) : nil
        self.skipLog = skipLog
        self.slabs = BlockSlabs(perConnection: configuration.blockSlabs, memoryLimit: configuration.blockSlabMemory)
        self.poller = try Poller()
        self.spawner = WorkerSpawner(
            executable: configuration.workerExecutable, arguments: configuration.workerArguments,
            mode: configuration.workerStart, logger: logger)
        let signalFD = cv_signalfd_for_lifecycle()
        guard signalFD >= 0 else { throw Errno(rawValue: errno) }
        self.signals = FileDescriptor(rawValue: signalFD)
        try poller.add(listener, .listener)
        try poller.add(signals, .signals)
        spawner.willStopForkServer = { [poller] server in
            poller.remove(server.pidfd)
            poller.remove(server.control)
        }
    }

    func makeID() -> UInt64 {
        defer { nextID += 1 }
        return nextID
    }

    /// Runs until shutdown completes. Returns the process exit code.
    func run() -> Int32 {
        maintainPool(now: Instant.now(), first: true)
        while true {
            if case .finished = phase { break }
            let now = Instant.now()
            let timeout = nextTimeoutMs(now: now)
            let events: [Poller.Event]
            do {
                events = try poller.wait(timeoutMs: timeout)
            } catch {
                logger.critical("epoll_wait failed: \(error)")
                return 1
            }
            for event in events { handle(event) }
            let after = Instant.now()
            handleTimers(now: after)
            dispatch()
            maintainPool(now: after)
            while true {
                let before = phase
                advanceShutdown(now: after)
                if case .finished = phase { break }
                if Self.sameStage(before, phase) { break }
            }
            if !announcedReady, isWarm {
                announcedReady = true
                onReady?(self)
            }
            onTick?(self)
            publishMetrics(now: after)
        }
        cleanUpAtExit()
        return 0
    }

    /// The pool is warm when as many workers as configured have said `ready` (or, after
    /// failed starts, when at least one has: a degraded pool still serves).
    var isWarm: Bool { pool.isWarm(target: configuration.workers) }

    private func handle(_ event: Poller.Event) {
        switch event.source {
        case .listener: acceptConnections()
        case .signals: handleSignals()
        case .connection(let id):
            guard let connection = connections[id] else { return }
            if event.writable { flush(connection) }
            guard event.readable, connections[id] != nil else { return }
            if !connection.readingPaused {
                readFrom(connection)
            } else if event.closed {
                // Input is not watched, so this is the hang-up, reported until handled.
                drop(connection, reason: "client closed the connection")
            }
        case .workerControl(let id):
            guard let worker = pool[id] else { return }
            readControl(of: worker)
        case .workerExit(let id):
            guard let worker = pool[id] else { return }
            handleExit(of: worker)
        case .forkServerExit(let id):
            guard spawner.forkServer != nil, UInt64(spawner.forkServerStarts) == id else { return }
            spawner.forkServerExited(now: Instant.now())
        case .forkServerControl(let id):
            guard spawner.forkServer != nil, UInt64(spawner.forkServerStarts) == id else { return }
            spawner.forkServerReadable(now: Instant.now())
        }
    }

    private func handleSignals() {
        while true {
            let signal = cv_signalfd_read(signals.rawValue)
            guard signal > 0 else { return }
            switch signal {
            case SIGHUP:
                logger.info("SIGHUP: reopening the skip log")
                skipLog?.reopen()
                quarantineImport?.requestReload()
            default:
                beginShutdown(reason: signalName(signal))
            }
        }
    }

    // MARK: - Timers

    private func nextTimeoutMs(now: Instant) -> Int32 {
        var earliest = now.adding(milliseconds: 1000)
        func consider(_ instant: Instant) { if instant < earliest { earliest = instant } }
        for worker in pool.workers.values {
            switch worker.state {
            case .starting(let deadline): consider(deadline)
            case .busy(_, let deadline):
                consider(deadline)
                if let cpu = worker.cpu { consider(cpu.nextSampleAt) }
            default: break
            }
        }
        if let oldest = queue.oldest() { consider(oldest.enqueuedAt.adding(milliseconds: configuration.queueWaitMs)) }
        for id in crashRetries {
            if let since = jobs[id]?.crashRetry?.since { consider(since.adding(milliseconds: configuration.queueWaitMs)) }
        }
        if pool.nextSpawnAllowed > now { consider(pool.nextSpawnAllowed) }
        if let paused = listenerPausedUntil { consider(paused) }
        switch phase {
        case .draining(let graceEnd): consider(graceEnd)
        case .stopping(let killAt, let giveUpAt):
            consider(killAt)
            consider(giveUpAt)
        default: break
        }
        if earliest <= now { return 0 }
        // Round up so a deadline is never checked a millisecond early and missed.
        return Int32((earliest.nanoseconds - now.nanoseconds + 999_999) / 1_000_000)
    }

    private func handleTimers(now: Instant) {
        for worker in pool.ordered {
            switch worker.state {
            case .busy(let jobID, let deadline) where deadline <= now:
                guard let job = jobs[jobID] else { continue }
                _ = worker.cpu?.sample(pid: worker.pid, now: now)
                worker.kill(reason: "deadline")
                counters.timeouts += 1
                answer(job, .failed(timeoutFailure(job, worker: worker)))
            case .busy where worker.cpu.map { $0.nextSampleAt <= now } == true:
                sampleCPU(of: worker, now: now)
            case .starting(let deadline) where deadline <= now:
                worker.kill(reason: "start timeout")
                recordStartFailure("worker \(worker.pid) did not say ready within \(configuration.workerStartTimeoutMs) ms")
            default:
                break
            }
        }
        while let oldest = queue.oldest(), oldest.enqueuedAt.adding(milliseconds: configuration.queueWaitMs) <= now {
            guard let job = jobs[oldest.job] else {
                queue.remove(oldest.job)
                continue
            }
            answer(job, .failed(DecodeFailure(
                .overloaded,
                "\(job.path): waited \(configuration.queueWaitMs) ms for a free worker; retry later",
                path: job.path, retryAfterMs: 1000)))
        }
        for id in crashRetries {
            // No worker that never refused media took it within the queue-wait bound (workers
            // fail to start): the first crash stands.
            guard let job = jobs[id], job.isQueued, let retry = job.crashRetry,
                retry.since.adding(milliseconds: configuration.queueWaitMs) <= now
            else { continue }
            var failure = retry.failure
            failure.message += " (a worker that had refused \(retry.refusedMedia) crashed; no fresh worker took the clip again within \(configuration.queueWaitMs) ms)"
            answer(job, .failed(failure))
        }
        if let paused = listenerPausedUntil, paused <= now, let listener {
            listenerPausedUntil = nil
            try? poller.add(listener, .listener)
        }
    }

    /// Reads a busy worker's CPU time: one that stopped using the CPU lends its slot (dispatch
    /// and the spare count follow the census), one that resumed takes it back.
    private func sampleCPU(of worker: WorkerProcess, now: Instant) {
        guard worker.cpu?.sample(pid: worker.pid, now: now) == true, let cpu = worker.cpu else { return }
        let clip: String = if case .busy(let jobID, _) = worker.state { jobs[jobID]?.path ?? "?" } else { "?" }
        if cpu.stalled {
            logger.info(
                "worker \(worker.pid) is blocked (\(Self.percent(cpu.lastShare)) of a CPU) on \(clip): its slot is lent until it resumes or its deadline",
                metadata: ["worker.pid": "\(worker.pid)", "clip.path": "\(clip)"])
        } else {
            logger.info("worker \(worker.pid) resumed on \(clip)", metadata: ["worker.pid": "\(worker.pid)"])
        }
    }

    static func percent(_ share: Double) -> String { "\(Int((share * 100).rounded()))%" }

    /// `timeout`, saying whether the worker was blocked (storage: a FIFO, a stalled mount) or
    /// computing (a codec stuck in a loop) when it was killed: operators fix the two differently.
    func timeoutFailure(_ job: ClipJob, worker: WorkerProcess) -> DecodeFailure {
        var message = "\(job.path): no answer within the \(job.deadlineMs) ms deadline; worker \(worker.pid) killed"
        var detail: String?
        if let cpu = worker.cpu {
            let used = JSONValue.format((cpu.secondsOnClip * 100).rounded() / 100)
            let seconds = JSONValue.format(Double(job.deadlineMs) / 1000)
            if cpu.stalled {
                message += "; it was blocked, not decoding (\(used) CPU-s in \(seconds) s): waiting on I/O such as a FIFO or a stalled mount"
                detail = "stalled"
            } else {
                message += "; it was busy on the CPU (\(used) CPU-s in \(seconds) s): the decoder may be stuck in a loop"
                detail = "busy"
            }
        }
        return DecodeFailure(.timeout, message, path: job.path, detail: detail)
    }

    // MARK: - Queue

    /// Queues a clip and hands it to an idle worker at once if one is free, so that requests
    /// read in the same batch see a queue length that counts only clips really waiting: the
    /// queue limit must not refuse a clip because an earlier one has not been dispatched yet.
    func enqueue(_ job: ClipJob) {
        jobs[job.id] = job
        queue.push(job.id, client: job.connectionID, at: job.enqueuedAt)
        dispatch()
    }

    /// Bytes of finished blocks still held in client outboxes.
    /// Counts blocks not yet written and those written but not yet read by their client.
    var heldBlockBytes: Int {
        connections.values.reduce(0) { $0 + $1.outboxBlockBytes + $1.unreadBlockBytes }
    }

    /// Blocks sent to clients and not yet read: each is an fd in flight, and the kernel refuses
    /// to pass more fds than the sender's RLIMIT_NOFILE while that many are in flight for the
    /// service user, so past this bound no clip is started.
    static let maxUnreadBlocks = 128

    /// Whether finished blocks waiting for clients leave room to start another clip.
    var roomForBlocks: Bool {
        var bytes = 0
        var count = 0
        for connection in connections.values {
            connection.settleUnreadBlocks()
            bytes += connection.outboxBlockBytes + connection.unreadBlockBytes
            count += connection.unreadBlockCount
        }
        return bytes < configuration.effectiveMemoryBudget && count < Self.maxUnreadBlocks
    }

    /// Clips that would start decoding at once rather than wait: idle workers, within the
    /// `workers` bound and the memory budget.
    var freeDecodeSlots: Int {
        guard case .running = phase, roomForBlocks else { return 0 }
        let census = pool.census
        return max(0, min(census.idle, configuration.workers - census.decoding))
    }

    /// Hands queued clips to idle workers while the memory budget allows.
    func dispatch() {
        guard case .running = phase else { return }
        // Blocks are produced one per busy worker, so the budget is checked against what
        // clients have not read yet.
        guard roomForBlocks else { return }
        // Spare workers stand by; no more than `workers` clips decode at once. A stalled worker
        // (blocked in I/O) holds no slot: its clip waits for I/O, not for the CPU.
        var busy = pool.census.decoding
        var idle = pool.idle
        dispatchCrashRetries(idle: &idle, busy: &busy)
        for worker in idle {
            guard busy < configuration.workers else { return }
            guard let jobID = queue.popNext() else { return }
            guard let job = jobs[jobID] else { continue }
            // The last clip waiting, with slots to spare: one caller on an idle pool gets the idle
            // cores as decoder threads (issue 14 §3). Clips that arrive meanwhile still take a
            // slot each; the over-subscription lasts one clip.
            let idleSlots = queue.count == 0 ? configuration.workers - busy - 1 : 0
            switch send(job, to: worker, threadBudget: job.threadBudget(idleSlots: idleSlots)) {
            case .sent:
                busy += 1
            case .workerFailed:
                // The worker died before taking the clip: the clip has not started, so it waits
                // for the next worker instead of failing, first in line.
                queue.pushFront(job.id, client: job.connectionID, enqueuedAt: job.enqueuedAt)
            case .jobRefused(let failure):
                // The job itself cannot travel; the worker is fine and stays idle.
                answer(job, .failed(failure))
            }
        }
    }

    /// Clips retried after a crash go first, each to an idle worker that never refused media
    /// (the crashed worker's replacement is one); without such a worker they keep waiting.
    private func dispatchCrashRetries(idle: inout [WorkerProcess], busy: inout Int) {
        while let jobID = crashRetries.first, busy < configuration.workers {
            // Answered meanwhile (cancelled, its sample failed, the wait bound): dropped here.
            guard let job = jobs[jobID], job.isQueued else {
                crashRetries.removeFirst()
                continue
            }
            guard let position = idle.firstIndex(where: { $0.refusedMedia == nil }) else { return }
            let worker = idle.remove(at: position)
            switch send(job, to: worker, threadBudget: 1) {
            case .sent:
                busy += 1
                crashRetries.removeFirst()
            case .workerFailed:
                continue  // the clip stays first in line for the next fresh worker
            case .jobRefused(let failure):
                crashRetries.removeFirst()
                answer(job, .failed(failure))
            }
        }
    }

    private enum SendOutcome {
        case sent
        case workerFailed
        case jobRefused(DecodeFailure)
    }

    private func send(_ job: ClipJob, to worker: WorkerProcess, threadBudget: Int) -> SendOutcome {
        job.quarantine = skipLog?.quarantine(for: job.path) ?? quarantineImport?.entry(for: job.path)
        // A decode whose client takes slabs writes its block into one (a clip passed as an fd
        // has its fd on the message already, and gets a fresh memfd).
        var lent: (slab: BlockSlab, allowance: Int)?
        if case .decode = job.kind, job.clipFD == nil, let connection = connections[job.connectionID] {
            lent = slabs.lend(to: connection.id, granted: connection.slabsGranted)
        }
        let bytes = job.workerJob(
            roots: configuration.roots, threadBudget: threadBudget,
            staysAfterRefusedMedia: configuration.afterRefusedMedia == .keep, slabLimit: lent?.allowance
        ).json.serialized()
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(Errno) in
                try SocketIO.send(worker.control, raw, passing: job.clipFD ?? lent?.slab.fd, nonBlocking: true)
            }
        }
        if case .success = result {
            worker.lentSlab = lent?.slab
        } else if let lent {
            slabs.takeBack(lent.slab)  // the worker never got it
        }
        switch result {
        case .success:
            break
        case .failure(.messageTooLong):
            let capacity = SocketIO.sendBufferBytes(worker.control)
            return .jobRefused(DecodeFailure(
                .invalidRequest,
                "\(job.path): the request needs \(bytes.count) bytes on the worker channel, which carries at most \(capacity); ask for fewer timestamps",
                path: job.path, detail: "timestamps"))
        case .failure(.tooManyReferences):
            // The service user has too many fds in flight (blocks clients have not read yet).
            return .jobRefused(DecodeFailure(
                .overloaded, "\(job.path): too many results are waiting to be read by clients; retry later",
                path: job.path, retryAfterMs: 500))
        case .failure(let error):
            logger.warning("worker \(worker.pid) refused a job: \(error); replacing it", metadata: ["worker.pid": "\(worker.pid)"])
            worker.kill(reason: "control socket failed")
            return .workerFailed
        }
        let now = Instant.now()
        job.state = .running(worker: worker.id, since: now)
        recordDispatch(of: job, at: now)
        worker.state = .busy(job: job.id, deadline: now.adding(milliseconds: job.deadlineMs))
        worker.cpu = CPUWatch(pid: worker.pid, thread: worker.servingThread, now: now)
        return .sent
    }

    // MARK: - Shutdown

    private static func sameStage(_ a: Phase, _ b: Phase) -> Bool {
        switch (a, b) {
        case (.running, .running), (.draining, .draining), (.stopping, .stopping), (.finished, .finished): true
        default: false
        }
    }

    func beginShutdown(reason: String) {
        guard case .running = phase else { return }
        logger.info("\(reason): shutting down; clips in flight have \(configuration.gracePeriodMs) ms to finish")
        phase = .draining(graceEnd: Instant.now().adding(milliseconds: configuration.gracePeriodMs))
        closeListener()
        for job in jobs.values {
            guard case .queued = job.state else { continue }
            answer(job, .failed(DecodeFailure(.cancelled, "\(job.path): the supervisor is shutting down", path: job.path)))
        }
    }

    private func closeListener() {
        guard let listener else { return }
        poller.remove(listener)
        try? listener.close()
        self.listener = nil
        if ownsSocketFile, let identity = socketFileIdentity, Self.fileIdentity(configuration.socketPath) == identity {
            unlink(configuration.socketPath)
        }
    }

    private func advanceShutdown(now: Instant) {
        switch phase {
        case .running, .finished:
            return
        case .draining(let graceEnd):
            let busy = pool.ordered.filter { if case .busy = $0.state { return true }; return false }
            if graceEnd <= now {
                for worker in busy {
                    if case .busy(let jobID, _) = worker.state, let job = jobs[jobID] {
                        worker.kill(reason: "shutdown")
                        answer(job, .failed(DecodeFailure(.cancelled, "\(job.path): the supervisor shut down before the clip finished", path: job.path)))
                    }
                }
            } else if !busy.isEmpty {
                return
            }
            for worker in pool.ordered { closeControl(of: worker) }
            phase = .stopping(killAt: now.adding(milliseconds: 2000), giveUpAt: now.adding(milliseconds: 5000))
        case .stopping(let killAt, let giveUpAt):
            if killAt <= now {
                for worker in pool.ordered { worker.kill(reason: "shutdown") }
            }
            let flushed = connections.values.allSatisfy { $0.outbox.isEmpty }
            if (pool.isEmpty && flushed) || giveUpAt <= now {
                phase = .finished
            }
        }
    }

    private func cleanUpAtExit() {
        spawner.stopForkServer()
        for worker in pool.ordered {
            worker.kill(reason: "exit")
            closeControl(of: worker)
        }
        // Reap what has died; a worker stuck in uninterruptible I/O is left to init.
        let until = Instant.now().adding(milliseconds: 1000)
        while !pool.isEmpty, Instant.now() < until {
            for worker in pool.ordered where worker.reap() != nil {
                poller.remove(worker.pidfd)
                try? worker.pidfd.close()
                pool.remove(worker)
            }
            usleep(5000)
        }
        for connection in connections.values {
            poller.remove(connection.fd)
            connection.closeAll()
        }
        connections.removeAll()
        slabs.closeAll()
        closeListener()
        logger.info("stopped")
    }
}
