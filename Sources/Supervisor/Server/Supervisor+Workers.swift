import Logging
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The worker pool: spawning ahead of need, reading worker replies, reaping exits.
extension Supervisor {
    /// Keeps `configuration.workers` live workers, spawning replacements at once unless start
    /// failures have armed the back-off (100 ms doubling to 30 s: the supervisor never spins).
    /// `first`: the supervisor's first call, which waits briefly for the fork server so that the
    /// first workers are clones too; later calls never wait for it.
    func maintainPool(now: Instant, first: Bool = false) {
        guard case .running = phase else { return }
        // A stalled worker's slot is lent, so a spare is started in its place: up to the cap.
        let target = configuration.workers + configuration.spareWorkers + pool.census.stalled
        let spawns = pool.spawnsNeeded(target: target, cap: configuration.effectiveMaxWorkers, now: now)
        if spawns > 0,
            let server = spawner.prepareForkServer(
                now: now, startTimeoutMs: configuration.workerStartTimeoutMs, waitMs: first ? 2000 : 0)
        {
            let id = UInt64(spawner.forkServerStarts)
            do {
                try poller.add(server.pidfd, .forkServerExit(id))
                try poller.add(server.control, .forkServerControl(id))
            } catch {
                logger.error("cannot watch the fork server \(server.pid): \(error)")
            }
        }
        for _ in 0..<spawns {
            let worker: WorkerProcess
            do {
                worker = try spawner.spawn(id: makeID(), startTimeoutMs: configuration.workerStartTimeoutMs)
            } catch {
                recordStartFailure(error.description)
                return
            }
            do {
                try poller.add(worker.control, .workerControl(worker.id))
                try poller.add(worker.pidfd, .workerExit(worker.id))
            } catch {
                logger.error("cannot watch worker \(worker.pid): \(error)")
                worker.kill(reason: "cannot watch")
            }
            pool.insert(worker)
            counters.spawns += 1
            metrics.spawns.increment()
        }
    }

    /// A worker could not be started or died before `ready`: log it clearly and back off.
    func recordStartFailure(_ reason: String) {
        counters.spawnFailures += 1
        metrics.spawnFailures.increment()
        let delay = pool.noteStartFailure(reason, now: Instant.now())
        logger.error(
            "decode worker failed to start (\(pool.consecutiveStartFailures) in a row): \(reason); next try in \(delay) ms",
            metadata: ["worker.executable": "\(configuration.workerExecutable)"])
        if let failure = noWorkersFailure() {
            // Nothing can decode: answer waiting clips now instead of at the queue bound.
            while let oldest = queue.oldest() {
                guard let job = jobs[oldest.job] else {
                    queue.remove(oldest.job)
                    continue
                }
                var named = failure
                named.path = job.path
                named.message = "\(job.path): \(failure.message)"
                answer(job, .failed(named))
            }
        }
    }

    /// `overloaded` with `detail: "no_workers"` when start failures persist and no worker is
    /// ready: clients should not wait for this to pass (docs/protocol.md).
    func noWorkersFailure() -> DecodeFailure? {
        guard pool.cannotStartAny else { return nil }
        let wait = max(0, pool.nextSpawnAllowed.milliseconds(since: Instant.now()))
        return DecodeFailure(
            .overloaded, "no decode worker can start: \(pool.lastStartError ?? "unknown error")", detail: "no_workers",
            retryAfterMs: max(wait, 100))
    }

    func readControl(of worker: WorkerProcess) {
        while worker.controlOpen {
            let result = receiveBuffer.withUnsafeMutableBytes { raw in
                Result { () throws(Errno) in try SocketIO.receive(worker.control, into: raw, nonBlocking: true) }
            }
            switch result {
            case .failure(let error):
                if error == .wouldBlock || error == .resourceTemporarilyUnavailable { return }
                closeControl(of: worker)
                return
            case .success(let received):
                if received.count == 0 {
                    // The worker is exiting; its pidfd tells us when and how.
                    try? received.fd?.close()
                    closeControl(of: worker)
                    return
                }
                let message = receiveBuffer.withUnsafeBytes { raw in
                    try? JSONValue.parse(UnsafeRawBufferPointer(rebasing: raw[0..<received.count]))
                }
                guard let message, !received.truncated else {
                    try? received.fd?.close()
                    protocolViolation(by: worker, "sent a malformed or truncated message")
                    return
                }
                handleWorkerMessage(message, fd: received.fd, from: worker)
            }
        }
    }

    /// Kills a worker that broke the protocol and answers `crashed` for `job` (by default, the
    /// one it is busy with).
    private func protocolViolation(by worker: WorkerProcess, _ problem: String, job given: ClipJob? = nil) {
        logger.error("worker \(worker.pid) \(problem); killing it", metadata: ["worker.pid": "\(worker.pid)"])
        var job = given
        if job == nil, case .busy(let jobID, _) = worker.state { job = jobs[jobID] }
        worker.kill(reason: "protocol violation")
        if let job {
            counters.crashes += 1
            answer(job, .failed(DecodeFailure(.crashed, "\(job.path): the decode worker \(problem)", path: job.path)))
        }
    }

    /// Tells the operator once, not once per worker, when workers run without the Landlock
    /// write ban (and when it is back), so a container that filters Landlock degrades visibly.
    func noteSandbox(of worker: WorkerProcess) {
        let previous = workerLandlock
        workerLandlock = (worker.landlockABI, worker.landlockProblem)
        guard previous?.problem != worker.landlockProblem else { return }
        if let problem = worker.landlockProblem {
            logger.warning(
                "decode workers run without the Landlock write ban: \(problem). no_new_privs and the resource limits still apply; set sandbox = \"required\" (--sandbox required) to refuse to decode without it",
                metadata: ["sandbox.missing": "landlock"])
        } else if previous != nil, configuration.landlock == .auto {
            logger.notice("decode workers have the Landlock write ban again (ABI \(worker.landlockABI))")
        }
    }

    private func handleWorkerMessage(_ message: JSONValue, fd: FileDescriptor?, from worker: WorkerProcess) {
        let reply: WorkerReply
        do {
            reply = try WorkerReply(json: message)
        } catch {
            try? fd?.close()
            protocolViolation(by: worker, "sent a malformed message: \(error)")
            return
        }
        switch reply {
        case .ready(let ready):
            try? fd?.close()
            guard case .starting = worker.state else {
                protocolViolation(by: worker, "said ready twice")
                return
            }
            guard ready.protocolVersion == ClipvisorVersion.workerProtocol else {
                worker.kill(reason: "protocol mismatch")
                recordStartFailure("worker \(ready.version) speaks protocol \(ready.protocolVersion), supervisor \(ClipvisorVersion.string) speaks \(ClipvisorVersion.workerProtocol): reinstall both from one build")
                return
            }
            worker.landlockABI = ready.landlockABI
            worker.landlockProblem = ready.landlockProblem
            worker.servingThread = ready.thread
            noteSandbox(of: worker)
            worker.state = .idle
            pool.noteReady()
        case .started(let jobID, let size, let mtime):
            try? fd?.close()
            if case .busy(let busyWith, _) = worker.state, jobID == busyWith, let job = jobs[jobID] {
                job.fileSize = size
                job.fileMtime = mtime
            }
        case .done(let jobID, let outcome, let exiting):
            handleDone(job: jobID, outcome: outcome, exiting: exiting, fd: fd, from: worker)
        }
    }

    private func handleDone(job jobID: JobID, outcome: WorkerReply.Outcome, exiting: Bool, fd: FileDescriptor?, from worker: WorkerProcess) {
        guard case .busy(let busyWith, _) = worker.state, jobID == busyWith else {
            try? fd?.close()
            // A reply racing a kill (deadline, cancel) is expected; anything else is a bug.
            if case .killed = worker.state { return }
            protocolViolation(by: worker, "answered a job it was not given")
            return
        }
        worker.clipsDone += 1
        worker.cpu = nil
        worker.state = exiting ? .retiring : .idle
        if exiting { counters.recycles += 1 }
        // The worker closed its slab before answering, so a sound reply frees it; one that
        // breaks the protocol leaves it lent until the worker is gone (`protocolViolation` kills it).
        let slab = worker.lentSlab
        func slabUnused() {
            guard let slab else { return }
            worker.lentSlab = nil
            slabs.takeBack(slab)
        }
        guard let job = jobs[jobID] else {
            try? fd?.close()
            slabUnused()
            return
        }
        switch (outcome, job.kind) {
        case (.decoded(let bytes, inSlab: true), .decode):
            try? fd?.close()
            guard let slab else {
                protocolViolation(by: worker, "said its block is in a slab it was not given", job: job)
                return
            }
            let header: BlockHeader
            do {
                guard bytes <= (try SharedMemory.size(of: slab.fd)) else { throw BlockError("\(bytes) bytes are more than the slab holds") }
                header = try BlockReader.header(of: slab.fd, blockBytes: bytes)
            } catch {
                protocolViolation(by: worker, "wrote a block into its slab that cannot be read: \(error)", job: job)
                return
            }
            worker.lentSlab = nil
            let attach: FileDescriptor?
            do { attach = try BlockSlabs.attachment(for: slab) } catch {
                slabs.takeBack(slab)
                answer(job, .failed(DecodeFailure(
                    .overloaded, "\(job.path): the supervisor has no file descriptor left to pass the block slab (\(error)); retry later",
                    path: job.path, retryAfterMs: 500)))
                return
            }
            noteCrashRetrySucceeded(job)
            answer(job, .decoded(result: header.result, block: .slab(slab, attach: attach), bytes: bytes))
        case (.decoded(let bytes, inSlab: false), .decode):
            guard let fd else {
                protocolViolation(by: worker, "sent a result without its block", job: job)
                return
            }
            guard SharedMemory.isSealed(fd), (try? SharedMemory.size(of: fd)) == bytes else {
                try? fd.close()
                protocolViolation(by: worker, "sent a block that is not sealed or not \(bytes) bytes", job: job)
                return
            }
            // The result travels once, in the block's header.
            let header: BlockHeader
            do {
                header = try BlockReader.header(of: fd, blockBytes: bytes)
            } catch {
                try? fd.close()
                protocolViolation(by: worker, "sent a block whose header cannot be read: \(error)", job: job)
                return
            }
            slabUnused()  // the block outgrew its slab, or never fitted
            noteCrashRetrySucceeded(job)
            answer(job, .decoded(result: header.result, block: .memfd(fd), bytes: bytes))
        case (.probed(let probe), .probe):
            slabUnused()
            try? fd?.close()
            noteCrashRetrySucceeded(job)
            answer(job, .probed(probe))
        case (.failed(let failure), _):
            slabUnused()
            try? fd?.close()
            if !exiting, failure.reason.workerAftermath == .suspect, worker.refusedMedia == nil {
                worker.refusedMedia = job.path
            }
            answer(job, .failed(failure))
        default:
            try? fd?.close()
            protocolViolation(by: worker, "answered a \(job.kind) job with the wrong kind of result", job: job)
        }
    }

    func closeControl(of worker: WorkerProcess) {
        guard worker.controlOpen else { return }
        worker.controlOpen = false
        poller.remove(worker.control)
        try? worker.control.close()
    }

    /// The worker's pidfd became readable: reap it and settle whatever it was doing.
    func handleExit(of worker: WorkerProcess) {
        guard let exit = worker.reap() else { return }
        poller.remove(worker.pidfd)
        try? worker.pidfd.close()
        // Its last reply may still wait in the channel (the exit can be seen first): a worker
        // that answered and then retired must not have its clip counted as a crash.
        readControl(of: worker)
        closeControl(of: worker)
        pool.remove(worker)
        // Gone: nothing writes into its slab any more, so it is free for the next clip.
        if let slab = worker.lentSlab {
            worker.lentSlab = nil
            slabs.takeBack(slab)
        }
        switch worker.state {
        case .starting:
            // During shutdown the supervisor closed its channel itself; that is no failed start.
            if case .running = phase {
                recordStartFailure(
                    missingLibrary(exit) ?? "worker \(worker.pid) \(exit) before it was ready\(startHint(exit))")
            }
        case .idle, .retiring:
            if exit != .exited(0) {
                logger.warning("idle worker \(worker.pid) \(exit)", metadata: ["worker.pid": "\(worker.pid)"])
            }
        case .busy(let jobID, _):
            guard let job = jobs[jobID] else { return }
            let failure = classify(exit, of: worker, job: job)
            if failure.reason == .crashed, let refused = worker.refusedMedia, job.crashRetry == nil, case .running = phase {
                retryOnFreshWorker(job, after: failure, in: worker, refused: refused)
            } else {
                answer(job, .failed(failure))
            }
        case .killed(let reason, let at):
            metrics.workerKilled(reason: reason)
            let waited = Instant.now().milliseconds(since: at)
            if waited > 1000 {
                logger.warning("worker \(worker.pid) took \(waited) ms to die after SIGKILL (\(reason))")
            }
        }
    }

    /// A worker that had refused bad media crashed on `job`: the crash may be the bad media's
    /// doing (a decoder that read it can leave the heap damaged without crashing at once), so
    /// the clip is not blamed yet. It waits for a worker that never refused media and is decoded
    /// there; if it crashes there too, it is answered `crashed` and quarantined as usual.
    private func retryOnFreshWorker(_ job: ClipJob, after failure: DecodeFailure, in worker: WorkerProcess, refused: String) {
        counters.crashRetries += 1
        logger.warning(
            "worker \(worker.pid) crashed (\(failure.detail ?? "crash")) on \(job.path) after it had refused \(refused): \(job.path) is tried again on a fresh worker before the crash is blamed on it",
            metadata: ["worker.pid": "\(worker.pid)", "clip.path": "\(job.path)"])
        job.crashRetry = ClipJob.CrashRetry(failure: failure, refusedMedia: refused, workerPID: worker.pid, since: Instant.now())
        job.state = .queued
        crashRetries.append(job.id)
    }

    /// A clip retried after a crash decoded on a fresh worker: the crash was most likely left
    /// behind by the media its first worker had refused. Operators hear of it once.
    private func noteCrashRetrySucceeded(_ job: ClipJob) {
        guard let retry = job.crashRetry else { return }
        logger.warning(
            "\(job.path) decoded on a fresh worker after worker \(retry.workerPID) crashed on it: that crash was most likely left behind by \(retry.refusedMedia), which the worker had refused earlier",
            metadata: ["clip.path": "\(job.path)"])
    }

    /// For a worker the dynamic loader stopped (exit 127), the library it could not load and
    /// the package to install (WorkerLibraries); asked once per run of failures.
    private func missingLibrary(_ exit: WorkerProcess.Exit) -> String? {
        guard exit == .exited(127) else { return nil }
        if pool.consecutiveStartFailures > 0, let last = pool.lastStartError, last.hasPrefix(WorkerLibraries.prefix) { return last }
        return WorkerLibraries.diagnose(worker: configuration.workerExecutable)
    }

    private func startHint(_ exit: WorkerProcess.Exit) -> String {
        switch exit {
        case .exited(WorkerMessage.ExitCode.sandbox.rawValue): " (it could not apply its limits or sandbox; see its stderr)"
        case .exited(WorkerMessage.ExitCode.usage.rawValue): " (it rejected its command line: is it from the same build?)"
        case .exited(127): " (exec failed)"
        default: ""
        }
    }

    /// What a worker's death while decoding means for the clip.
    private func classify(_ exit: WorkerProcess.Exit, of worker: WorkerProcess, job: ClipJob) -> DecodeFailure {
        switch exit {
        case .signaled(SIGKILL):
            return DecodeFailure(
                .outOfMemory,
                "\(job.path): the decode worker \(worker.pid) was killed by SIGKILL, not by clipvisor (most likely the kernel's OOM killer)",
                path: job.path, detail: "SIGKILL")
        case .signaled(SIGXCPU):
            counters.timeouts += 1
            return DecodeFailure(
                .timeout, "\(job.path): the decode worker ran out of its CPU-time limit", path: job.path, detail: "SIGXCPU")
        case .signaled(let signal):
            counters.crashes += 1
            return DecodeFailure(
                .crashed, "\(job.path): the decode worker \(worker.pid) crashed with \(signalName(signal))", path: job.path,
                detail: signalName(signal))
        case .exited(let code):
            counters.crashes += 1
            return DecodeFailure(
                .crashed, "\(job.path): the decode worker \(worker.pid) exited with code \(code) without answering",
                path: job.path, detail: "exit \(code)")
        }
    }
}
