import Logging
import Shared

#if canImport(Glibc)
import Glibc
#endif

/// Skip records, quarantine answers and the `status` report.
extension Supervisor {
    /// Records a clip-level skip durably before the answer goes out, and logs it through the
    /// logger with every field of the record as metadata: a stderr line, or under systemd one
    /// journal entry that `journalctl SKIP_REASON=timeout` finds. Caller outcomes and
    /// quarantine repeats are only counted.
    func recordSkip(_ job: ClipJob, _ failure: DecodeFailure, elapsedMs: Int) {
        guard failure.reason.isClipLevel else { return }
        var record = SkipRecord(path: job.path, reason: failure.reason)
        record.size = job.fileSize
        record.mtime = job.fileMtime
        record.detail = failure.detail.map { "\(failure.message) [\($0)]" } ?? failure.message
        record.elapsedMs = elapsedMs
        record.deadlineMs = job.deadlineMs
        record.requestID = job.requestID
        record.tag = job.tag
        if let connection = connections[job.connectionID] {
            record.clientPID = Int(connection.peer.pid)
            record.clientUID = Int(connection.peer.uid)
        }
        if skipLog?.append(record) == false { metrics.skipLogWriteErrors.increment() }
        logger.warning("skipped, \(failure.reason): \(failure.message)", metadata: record.logMetadata)
    }

    /// The `skips` operation: recent records, newest first, filtered like `clipvisor skips`.
    func skipsResponse(_ fields: [String: JSONValue]) throws(DecodeFailure) -> [String: JSONValue] {
        try rejectUnknownKeys(fields, allowed: ["op", "id", "reason", "since_s", "path_glob", "tag", "limit"])
        let reader = FieldReader(fields)
        var filter = SkipFilter()
        if let reason = try reader.string("reason") {
            guard let parsed = SkipReason(rawValue: reason) else {
                throw FieldReader.invalid("reason", "unknown reason \"\(reason)\"")
            }
            filter.reason = parsed
        }
        if let since = try reader.double("since_s", min: 0) {
            filter.sinceMs = Timestamp.nowMilliseconds() - Int64(since * 1000)
        }
        filter.pathGlob = try reader.string("path_glob")
        filter.tag = try reader.string("tag")
        let limit = try reader.int("limit", min: 1, max: SkipLog.recentLimit) ?? 100
        let matching = (skipLog?.recent ?? []).filter(filter.matches)
        var counts: [String: JSONValue] = [:]
        for record in matching {
            let key = record.reason?.rawValue ?? "?"
            counts[key] = .number((counts[key]?.doubleValue ?? 0) + 1)
        }
        return [
            "skips": .array(matching.suffix(limit).reversed().map(\.json)),
            "counts": .object(counts), "total": .number(Double(matching.count)),
        ]
    }

    /// The `forget` operation: lifts quarantine for a path or for everything.
    func forgetResponse(_ fields: [String: JSONValue]) throws(DecodeFailure) -> [String: JSONValue] {
        try rejectUnknownKeys(fields, allowed: ["op", "id", "path", "all"])
        let reader = FieldReader(fields)
        let path = try reader.string("path")
        let all = try reader.bool("all") ?? false
        guard (path != nil) != all else { throw FieldReader.invalid("path", "give either 'path' or \"all\": true") }
        guard let skipLog else { return ["forgotten": 0] }
        return ["forgotten": .number(Double(skipLog.forget(path: path)))]
    }

    func statusJSON() -> JSONValue {
        let now = Instant.now()
        var workerList: [JSONValue] = []
        for worker in pool.ordered {
            var entry: [String: JSONValue] = [
                "pid": .number(Double(worker.pid)), "state": .string(worker.stateName),
                "clips_done": .number(Double(worker.clipsDone)), "landlock": .number(Double(worker.landlockABI)),
                "refused_media": worker.refusedMedia.map { .string($0) } ?? .null,
                "age_ms": .number(Double(now.milliseconds(since: worker.spawnedAt))),
            ]
            if let stat = ProcStat.read(pid: worker.pid) { entry["cpu_s"] = .number(stat.cpuSeconds) }
            if case .busy(let jobID, _) = worker.state, let job = jobs[jobID] {
                entry["clip"] = .string(job.path)
                entry["deadline_ms"] = .number(Double(job.deadlineMs))
                if case .running(_, let since) = job.state { entry["busy_ms"] = .number(Double(now.milliseconds(since: since))) }
                entry["stalled"] = .bool(worker.isStalled)
                if let cpu = worker.cpu { entry["clip_cpu_s"] = .number((cpu.secondsOnClip * 1000).rounded() / 1000) }
            }
            workerList.append(.object(entry))
        }
        let phaseName: String
        switch phase {
        case .running: phaseName = "running"
        case .draining: phaseName = "draining"
        case .stopping: phaseName = "stopping"
        case .finished: phaseName = "finished"
        }
        return [
            "pid": .number(Double(getpid())), "version": .string(ClipvisorVersion.string), "phase": .string(phaseName),
            "uptime_s": .number(Double(now.milliseconds(since: startedAt)) / 1000), "socket": .string(configuration.socketPath),
            "workers": [
                "target": .number(Double(configuration.workers)), "spare": .number(Double(configuration.spareWorkers)),
                "live": .number(Double(pool.census.live)), "max": .number(Double(configuration.effectiveMaxWorkers)),
                "stalled": .number(Double(pool.census.stalled)),
                "clips_per_worker": .number(Double(configuration.clipsPerWorker)), "list": .array(workerList),
                "consecutive_start_failures": .number(Double(pool.consecutiveStartFailures)),
                "last_start_error": pool.lastStartError.map { .string($0) } ?? .null,
                "start": spawner.statusJSON,
            ],
            "queue": [
                "length": .number(Double(queue.count)), "limit": .number(Double(configuration.queueLimit)),
                "wait_limit_ms": .number(Double(configuration.queueWaitMs)),
            ],
            "deadlines": [
                "default_ms": .number(Double(configuration.deadlineDefaultMs)), "max_ms": .number(Double(configuration.deadlineMaxMs)),
            ],
            "memory": [
                "block_bytes_held": .number(Double(heldBlockBytes)), "budget": .number(Double(configuration.effectiveMemoryBudget)),
                "blocks_unread": .number(Double(connections.values.reduce(0) { $0 + $1.unreadBlockCount })),
                "block_pages": BlockPages.statusJSON(),
                "slabs": [
                    "count": .number(Double(slabs.count)), "bytes": .number(Double(slabs.accountedBytes)),
                    "limit": .number(Double(slabs.memoryLimit)), "per_connection": .number(Double(slabs.perConnection)),
                ],
            ],
            "sandbox": sandboxJSON,
            "connections": .number(Double(connections.count)), "counters": counters.json,
            "clients": .array(clientsJSON()), "metrics": .object(metricsEndpoints),
            "skip_log": skipLog?.statusJSON ?? .null,
            "quarantine_import": quarantineImport?.statusJSON ?? .null,
        ]
    }
}

extension Supervisor {
    /// Per connection: who it is and how many of its clips wait and decode (`clipvisor top`).
    func clientsJSON() -> [JSONValue] {
        // Waiting clips come from the queue's lanes; decoding ones from the busy workers.
        let queued = queue.depths
        var running: [UInt64: Int] = [:]
        for worker in pool.workers.values {
            if case .busy(let jobID, _) = worker.state, let job = jobs[jobID] { running[job.connectionID, default: 0] += 1 }
        }
        return connections.values.sorted { $0.id < $1.id }.map { connection in
            let held = slabs.slabs(of: connection.id)
            return [
                "pid": .number(Double(connection.peer.pid)), "uid": .number(Double(connection.peer.uid)),
                "queued": .number(Double(queued[connection.id] ?? 0)), "running": .number(Double(running[connection.id] ?? 0)),
                "slabs": .number(Double(held.count)),
                "slabs_delivered": .number(Double(held.filter { $0.state == .delivered }.count)),
            ]
        }
    }

    /// Which sandbox layers the workers run with, and why one is missing (docs/protocol.md, `status`).
    var sandboxJSON: JSONValue {
        var entry: [String: JSONValue] = [
            "landlock_mode": .string(configuration.landlock.rawValue),
            "limits": ["no_new_privs", "rlimits"],
        ]
        if let state = workerLandlock {
            entry["landlock_abi"] = .number(Double(state.abi))
            let missing = state.abi > 0 ? [] : ["landlock"]
            entry["missing"] = .array(missing.map { .string($0) })
            entry["problem"] = state.problem.map { .string($0) } ?? (configuration.landlock == .off ? "switched off (sandbox = \"off\")" : .null)
        }
        return .object(entry)
    }
}

/// Which skip records a query wants.
struct SkipFilter {
    var reason: SkipReason?
    var sinceMs: Int64?
    var pathGlob: String?
    var tag: String?

    func matches(_ record: SkipRecord) -> Bool {
        guard record.event == .skip else { return false }
        if let reason, record.reason != reason { return false }
        if let sinceMs, record.timestampMs < sinceMs { return false }
        if let tag, record.tag != tag { return false }
        if let pathGlob {
            guard let path = record.path, fnmatch(pathGlob, path, 0) == 0 else { return false }
        }
        return true
    }
}
