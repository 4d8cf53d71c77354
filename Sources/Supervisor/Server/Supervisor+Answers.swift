import Shared
import SystemPackage

/// Answering: every clip is answered exactly once, from whichever event settles it (a worker's
/// reply or exit, a deadline, a cancel, the queue-wait bound), the skip log written first;
/// a sample's bookkeeping is `SampleState`'s. Requests are read in Supervisor+Clients.swift.
extension Supervisor {
    enum Outcome {
        case decoded(result: JSONValue, block: DeliveredBlock, bytes: Int)
        case probed(JSONValue)
        case failed(DecodeFailure)
    }

    /// Answers a clip exactly once. A clip-level skip is written to the skip log (durably)
    /// before the client can see the answer.
    func answer(_ job: ClipJob, _ outcome: Outcome) {
        guard !job.isAnswered else {
            if case .decoded(_, let block, _) = outcome { discard(block) }
            return
        }
        if case .queued = job.state { queue.remove(job.id) }
        let previousState = job.state
        job.state = .answered
        recordMetrics(answering: job, previousState: previousState, outcome: outcome)
        jobs.removeValue(forKey: job.id)
        try? job.clipFD?.close()
        job.clipFD = nil
        var workerElapsed = 0
        if case .running(_, let since) = previousState { workerElapsed = Instant.now().milliseconds(since: since) }
        let (message, attached, blockBytes, failure) = clipMessage(job, outcome, workerElapsedMs: workerElapsed)
        var slab: BlockSlab?
        if case .decoded(_, .slab(let inSlab, _), _) = outcome { slab = inSlab }
        // An answer that goes nowhere frees its slab; one on its way marks it delivered.
        func dropped() {
            try? attached?.close()
            if let slab { slabs.takeBack(slab) }
        }

        guard let connection = connections[job.connectionID] else {
            dropped()
            return
        }
        if let slab, connection.pending[job.requestID] != nil { slabs.deliver(slab) }
        switch connection.pending[job.requestID] {
        case .single:
            connection.pending.removeValue(forKey: job.requestID)
            connection.enqueue(message, fd: attached, blockBytes: blockBytes)
        case .sample(let sample):
            connection.enqueue(message, fd: attached, blockBytes: blockBytes)
            guard let clip = job.clipIndex else { break }
            let next = sample.record(clip: clip, failure: failure)
            if let reason = next.cancelMessage {
                for siblingID in next.cancel {
                    if let sibling = jobs[siblingID] { cancel(sibling, message: reason(sibling.path)) }
                }
            }
            if let done = next.done {
                metrics.sample(failure: sample.firstFailure?.failure.reason)
                connection.pending.removeValue(forKey: job.requestID)
                connection.enqueue(done)
            }
        case nil:
            dropped()
            return
        }
        flush(connection)
    }

    /// A block that will not be delivered: its memfd closed, or its slab free again.
    func discard(_ block: DeliveredBlock) {
        switch block {
        case .memfd(let fd): try? fd.close()
        case .slab(let slab, let attach):
            try? attach?.close()
            slabs.takeBack(slab)
        }
    }

    /// The answer message of one clip, its block, and the failure if any; counts the outcome
    /// and records a skip in the skip log.
    private func clipMessage(
        _ job: ClipJob, _ outcome: Outcome, workerElapsedMs: Int
    ) -> (JSONValue, FileDescriptor?, Int, DecodeFailure?) {
        var message: [String: JSONValue] = [
            "id": .number(Double(job.requestID)),
            "elapsed_ms": .number(Double(Instant.now().milliseconds(since: job.enqueuedAt))),
        ]
        if let clip = job.clipIndex { message["clip"] = .number(Double(clip)) }
        switch outcome {
        case .decoded(let result, let block, let bytes):
            counters.decoded += 1
            counters.bytesOut += bytes
            if job.quarantine != nil || skipLog?.entries[job.path] != nil { skipLog?.clear(path: job.path) }
            message["ok"] = true
            message["result"] = result
            message["block_bytes"] = .number(Double(bytes))
            switch block {
            case .memfd(let fd):
                return (.object(message), fd, bytes, nil)
            case .slab(let slab, let attach):
                // The slab's fd goes with its first block only. Its memory is on the slabs' own
                // limit, not the unread blocks'.
                message["slab"] = ["index": .number(Double(slab.index)), "attached": .bool(attach != nil)]
                return (.object(message), attach, 0, nil)
            }
        case .probed(let probe):
            counters.probed += 1
            message["ok"] = true
            message["probe"] = probe
            return (.object(message), nil, 0, nil)
        case .failed(let failure):
            counters.skipped[failure.reason, default: 0] += 1
            message["ok"] = false
            message["error"] = failure.json
            recordSkip(job, failure, elapsedMs: workerElapsedMs)
            return (.object(message), nil, 0, failure)
        }
    }
}
