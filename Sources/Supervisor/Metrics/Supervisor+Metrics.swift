import Shared

/// The event loop's side of the metrics: recording answers, and publishing gauges of its state
/// once per loop iteration. Only this thread reads the loop's state; scrapers read the gauges.
extension Supervisor {
    /// Gauges of the loop's state, set after every iteration (a few atomic stores). The
    /// quarantine count walks the table, so it is refreshed at most once a second.
    func publishMetrics(now: Instant) {
        let census = pool.census
        // Idle workers beyond the ones that may decode now are the spares (docs/operations.md);
        // a stalled worker (blocked in I/O) is busy but holds no decode slot.
        let usable = max(0, min(census.idle, configuration.workers - census.decoding))
        let counts = [
            "starting": census.starting, "idle": usable, "spare": census.idle - usable, "busy": census.decoding,
            "stalled": census.stalled, "retiring": census.retiring, "killed": census.killed,
        ]
        metrics.publishWorkers(counts, livePIDs: pool.workers.values.map(\.pid))
        metrics.queueDepth.set(Double(queue.count))
        metrics.clientsConnected.set(Double(connections.count))
        metrics.workersConfigured.set(Double(configuration.workers))
        metrics.memoryHeldBytes.set(Double(heldBlockBytes))
        metrics.memoryBudgetBytes.set(Double(configuration.effectiveMemoryBudget))
        metrics.blockSlabs.set(Double(slabs.count))
        metrics.blockSlabBytes.set(Double(slabs.accountedBytes))
        if now.milliseconds(since: metricsQuarantineRefreshed) >= 1000 {
            metricsQuarantineRefreshed = now
            metrics.quarantineEntries.set(Double(skipLog?.quarantinedCount ?? 0))
        }
    }

    /// Records one clip's answer: its outcome and the three latencies, and the block's size.
    func recordMetrics(answering job: ClipJob, previousState: ClipJob.State, outcome: Outcome) {
        let now = Instant.now()
        func seconds(since instant: Instant) -> Double { now.seconds(since: instant) }
        metrics.answerSeconds.record(seconds(since: job.enqueuedAt))
        switch previousState {
        case .queued: metrics.queueWaitSeconds.record(seconds(since: job.enqueuedAt))
        case .running(_, let since): metrics.decodeSeconds.record(seconds(since: since))
        case .answered: break
        }
        switch outcome {
        case .decoded(let result, _, let bytes):
            metrics.clip(outcome: result["partial"]?.boolValue == true ? "partial" : "ok")
            metrics.blockBytes.record(Double(bytes))
            metrics.bytesDelivered.increment(by: Double(bytes))
        case .probed:
            metrics.clip(outcome: "ok")
        case .failed(let failure):
            metrics.clip(outcome: failure.reason.rawValue)
        }
    }

    /// A clip handed to a worker: the end of its wait in the queue.
    func recordDispatch(of job: ClipJob, at now: Instant) {
        metrics.queueWaitSeconds.record(now.seconds(since: job.enqueuedAt))
    }

    /// The `metrics` operation: the same text the HTTP listener serves.
    func metricsResponse(_ fields: [String: JSONValue]) throws(DecodeFailure) -> [String: JSONValue] {
        try rejectUnknownKeys(fields, allowed: ["op", "id"])
        return ["content_type": .string(SupervisorMetrics.contentType), "text": .string(metrics.text())]
    }
}

extension Instant {
    /// Seconds from `earlier` to this instant (0 if `earlier` is later), for histograms.
    func seconds(since earlier: Instant) -> Double {
        nanoseconds > earlier.nanoseconds ? Double(nanoseconds - earlier.nanoseconds) / 1e9 : 0
    }
}
