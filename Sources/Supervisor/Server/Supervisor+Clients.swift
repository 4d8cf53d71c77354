import CClipvisorShims
import Logging
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Client connections: accepting, reading framed requests, answering.
extension Supervisor {
    /// Keys of a `decode`/`probe` request or of a `sample` clip that are not decode options.
    static let clipKeys: Set<String> = ["path", "fd", "deadline_ms", "tag"]

    func acceptConnections() {
        guard let listener else { return }
        while true {
            let fd = cv_accept_nonblocking(listener.rawValue)
            if fd < 0 {
                let error = Errno(rawValue: errno)
                switch error {
                case .wouldBlock, .resourceTemporarilyUnavailable, .interrupted, Errno(rawValue: ECONNABORTED):
                    return
                default:
                    // Out of fds (EMFILE/ENFILE) or memory: stop accepting for a moment rather
                    // than spin on a listener that stays readable.
                    logger.error("accept failed: \(error); pausing new connections for 200 ms")
                    poller.remove(listener)
                    listenerPausedUntil = Instant.now().adding(milliseconds: 200)
                    return
                }
            }
            var pid: pid_t = 0
            var uid: uid_t = 0
            var gid: gid_t = 0
            _ = cv_peer_credentials(fd, &pid, &uid, &gid)
            let connection = Connection(
                id: makeID(), fd: FileDescriptor(rawValue: fd), peer: .init(pid: pid, uid: uid, gid: gid))
            do {
                try poller.add(connection.fd, .connection(connection.id))
            } catch {
                logger.error("cannot watch a new connection: \(error)")
                connection.closeAll()
                continue
            }
            connections[connection.id] = connection
            counters.connections += 1
            metrics.connectionsAccepted.increment()
        }
    }

    /// Answers waiting to be written at which a connection's requests stop being read.
    static let pauseReadingAt = 1024

    func readFrom(_ connection: Connection) {
        guard !connection.readingPaused else { return }
        // Bounded per event so one chatty client cannot starve the others.
        for _ in 0..<32 {
            let want = min(connection.inbox.bytesToCompleteFrame, 65_536)
            let result = receiveBuffer.withUnsafeMutableBytes { raw in
                Result { () throws(Errno) in
                    try SocketIO.receive(connection.fd, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<want]), nonBlocking: true)
                }
            }
            switch result {
            case .failure(let error):
                if error == .wouldBlock || error == .resourceTemporarilyUnavailable { return }
                drop(connection, reason: "read failed: \(error)")
                return
            case .success(let received):
                if let fd = received.fd {
                    // One fd per message; any other is the client's mistake and closed at once,
                    // so no client can pile fds up in the supervisor.
                    if connection.messageFD == nil, !connection.closeAfterFlush {
                        connection.messageFD = fd
                    } else {
                        try? fd.close()
                    }
                }
                if received.count == 0 {
                    drop(connection, reason: "client closed the connection")
                    return
                }
                if connection.closeAfterFlush { continue }
                receiveBuffer.withUnsafeBytes { connection.inbox.append(UnsafeRawBufferPointer(rebasing: $0[0..<received.count])) }
                processMessages(of: connection)
                guard connections[connection.id] != nil else { return }
            }
        }
    }

    private func processMessages(of connection: Connection) {
        while !connection.closeAfterFlush {
            let body: [UInt8]?
            do {
                body = try connection.inbox.next()
            } catch {
                counters.protocolErrors += 1
                fatalProtocolError(connection, message: "\(error); closing the connection")
                return
            }
            guard let body else { break }
            handleMessage(body, from: connection)
            guard connections[connection.id] != nil else { return }
            // An fd the message did not claim (it was refused, or did not declare one) must
            // never reach a later message.
            try? connection.messageFD?.close()
            connection.messageFD = nil
        }
        flush(connection)
    }

    /// Answers an error that ends the connection (framing broken, no hello).
    private func fatalProtocolError(_ connection: Connection, message: String, id: JSONValue = .null) {
        connection.enqueue(["id": id, "ok": false, "error": DecodeFailure(.invalidRequest, message).json])
        connection.closeAfterFlush = true
        flush(connection)
    }

    private func reply(_ connection: Connection, id: JSONValue, failure: DecodeFailure) {
        counters.protocolErrors += failure.reason == .invalidRequest ? 1 : 0
        connection.enqueue(["id": id, "ok": false, "error": failure.json])
    }

    private func handleMessage(_ body: [UInt8], from connection: Connection) {
        let value: JSONValue
        do {
            value = try JSONValue.parse(body)
        } catch {
            reply(connection, id: .null, failure: DecodeFailure(.invalidRequest, "\(error)"))
            return
        }
        guard var fields = value.objectValue else {
            reply(connection, id: .null, failure: DecodeFailure(.invalidRequest, "a message must be a JSON object, got \(value.typeName)"))
            return
        }
        let idValue = fields["id"] ?? .null
        guard let op = fields["op"]?.stringValue else {
            reply(connection, id: idValue, failure: FieldReader.invalid("op", "missing or not a string"))
            return
        }
        counters.requests += 1
        metrics.request(op)
        if op == "hello" {
            handleHello(fields, from: connection)
            return
        }
        guard connection.greeted else {
            fatalProtocolError(connection, message: "the first message must be {\"op\":\"hello\",\"protocol\":1}", id: idValue)
            return
        }
        guard let id = idValue.intValue, id >= 0 else {
            reply(connection, id: idValue, failure: FieldReader.invalid("id", "must be an integer ≥ 0, got \(idValue.jsonString)"))
            return
        }
        guard connection.pending[id] == nil else {
            reply(connection, id: idValue, failure: FieldReader.invalid("id", "\(id) is already in flight on this connection"))
            return
        }
        do throws(DecodeFailure) {
            fields = try releasingSlabs(fields, of: connection)
        } catch {
            if op == "sample" {
                connection.enqueue(["id": idValue, "ok": false, "done": true, "error": error.json])
            } else {
                reply(connection, id: idValue, failure: error)
            }
            return
        }
        do throws(DecodeFailure) {
            switch op {
            case "decode": try handleClip(fields, id: id, kind: .decode, from: connection)
            case "probe": try handleClip(fields, id: id, kind: .probe, from: connection)
            case "sample":
                do throws(DecodeFailure) {
                    try handleSample(fields, id: id, from: connection)
                } catch {
                    // Refused as a whole: one final answer, so clients need no special case.
                    connection.enqueue(["id": idValue, "ok": false, "done": true, "error": error.json])
                }
            case "cancel": try handleCancel(fields, id: id, from: connection)
            case "release":
                // Slabs released on their own (`release_slabs`, freed above): a sample's later
                // clips can have them before the client sends anything else.
                try rejectUnknownKeys(fields, allowed: ["op", "id"])
                connection.enqueue(["id": idValue, "ok": true])
            case "status":
                try rejectUnknownKeys(fields, allowed: ["op", "id"])
                connection.enqueue(["id": idValue, "ok": true, "status": statusJSON()])
            case "skips":
                connection.enqueue(JSONValue.object(["id": idValue, "ok": true]).merging(try skipsResponse(fields)))
            case "forget":
                connection.enqueue(JSONValue.object(["id": idValue, "ok": true]).merging(try forgetResponse(fields)))
            case "metrics":
                connection.enqueue(JSONValue.object(["id": idValue, "ok": true]).merging(try metricsResponse(fields)))
            default:
                throw FieldReader.invalid("op", "unknown operation \"\(op)\" (decode, sample, probe, cancel, release, status, skips, forget, metrics)")
            }
        } catch {
            reply(connection, id: idValue, failure: error)
        }
    }

    private func handleHello(_ fields: [String: JSONValue], from connection: Connection) {
        func refuse(_ failure: DecodeFailure) {
            connection.enqueue(["op": "hello", "ok": false, "error": failure.json])
            connection.closeAfterFlush = true
        }
        let version = fields["protocol"]?.intValue
        guard version == ClipvisorVersion.clientProtocol else {
            refuse(DecodeFailure(
                .invalidRequest,
                "protocol \(fields["protocol"]?.jsonString ?? "missing") is not supported; this server speaks \(ClipvisorVersion.clientProtocol)"))
            return
        }
        let requestedSlabs: Int
        do throws(DecodeFailure) {
            requestedSlabs = try FieldReader(fields).int("slabs", min: 0, max: BlockSlabs.maxPerConnection) ?? 0
        } catch {
            refuse(error)
            return
        }
        connection.greeted = true
        connection.slabsGranted = slabs.grant(requested: requestedSlabs)
        connection.enqueue([
            "op": "hello", "ok": true, "protocol": .number(Double(ClipvisorVersion.clientProtocol)),
            "server": .string("clipvisor \(ClipvisorVersion.string)"), "pid": .number(Double(getpid())),
            "max_message_bytes": .number(Double(MessageFraming.maxMessageBytes)),
            "deadline_ms_default": .number(Double(configuration.deadlineDefaultMs)),
            "deadline_ms_max": .number(Double(configuration.deadlineMaxMs)),
            "queue_wait_ms": .number(Double(configuration.queueWaitMs)),
            "slabs": .number(Double(connection.slabsGranted)),
        ])
    }

    /// Frees the slabs a request's `release_slabs` names and returns the request without that
    /// key (any request may carry it: clients release with whatever they send next).
    private func releasingSlabs(_ fields: [String: JSONValue], of connection: Connection) throws(DecodeFailure) -> [String: JSONValue] {
        guard let value = fields["release_slabs"] else { return fields }
        guard let list = value.arrayValue, list.count <= BlockSlabs.maxPerConnection else {
            throw FieldReader.invalid("release_slabs", "must be an array of at most \(BlockSlabs.maxPerConnection) slab indices")
        }
        var indices: [Int] = []
        for item in list {
            guard let index = item.intValue, index >= 0 else {
                throw FieldReader.invalid("release_slabs", "\(item.jsonString) is not a slab index")
            }
            indices.append(index)
        }
        try slabs.release(indices, of: connection.id)
        var rest = fields
        rest.removeValue(forKey: "release_slabs")
        return rest
    }

    func rejectUnknownKeys(_ fields: [String: JSONValue], allowed: Set<String>) throws(DecodeFailure) {
        for key in fields.keys.sorted() where !allowed.contains(key) {
            throw FieldReader.invalid(key, "unknown field")
        }
    }

    enum ClipKind { case decode, probe }

    /// A clip's fields, validated: everything a job needs except its ids.
    struct ClipRequest {
        var path: String
        var clipFD: FileDescriptor?
        var options: DecodeOptions
        var deadlineMs: Int
        var tag: String?
        /// The request set `threads` itself: the pool then gives it no idle slots as threads.
        var threadsChosen: Bool
    }

    /// Validates one clip's fields. Takes the client's fd when the clip declares `"fd": true`;
    /// the caller owns it from then on.
    func parseClip(_ fields: [String: JSONValue], kind: ClipKind, allowFD: Bool, from connection: Connection) throws(DecodeFailure) -> ClipRequest {
        let reader = FieldReader(fields)
        let wantsFD = try reader.bool("fd") ?? false
        if wantsFD, !allowFD {
            throw FieldReader.invalid("fd", "sample clips cannot pass fds; send one decode per clip instead")
        }
        var clipFD: FileDescriptor?
        if wantsFD {
            guard let fd = connection.messageFD else {
                throw FieldReader.invalid("fd", "\"fd\": true but no file descriptor came with the message")
            }
            clipFD = fd
            connection.messageFD = nil
        }
        do throws(DecodeFailure) {
            var allowed = Self.clipKeys.union(["op", "id"])
            if kind == .decode { allowed.formUnion(DecodeOptions.protocolKeys) }
            try rejectUnknownKeys(fields, allowed: allowed)
            let path = try reader.string("path", maxLength: 4096)
            if clipFD == nil {
                guard let path else { throw FieldReader.invalid("path", "missing (or pass the clip as an fd with \"fd\": true)") }
                guard path.hasPrefix("/") else { throw FieldReader.invalid("path", "must be absolute, got \"\(path)\"") }
            }
            var options = kind == .decode ? try DecodeOptions(json: fields) : DecodeOptions()
            options.maxSourcePixels = min(options.maxSourcePixels, configuration.maxSourcePixels)
            options.maxOutputBytes = min(options.maxOutputBytes, configuration.maxOutputBytes)
            let deadline = try reader.int("deadline_ms", min: 1, max: configuration.deadlineMaxMs) ?? configuration.deadlineDefaultMs
            let tag = try reader.string("tag", maxLength: 256)
            return ClipRequest(
                path: path ?? Self.name(ofPassedFile: clipFD!), clipFD: clipFD, options: options, deadlineMs: deadline, tag: tag,
                threadsChosen: fields["threads"] != nil)
        } catch {
            try? clipFD?.close()
            throw error
        }
    }

    /// A name for a clip passed as an fd without a path: its file's identity, so that messages,
    /// the skip log and the quarantine tell clips apart (an fd number is reused at once).
    static func name(ofPassedFile fd: FileDescriptor) -> String {
        var info = stat()
        guard fstat(fd.rawValue, &info) == 0 else { return "fd:\(fd.rawValue)" }
        return "fd:dev=\(info.st_dev),ino=\(info.st_ino)"
    }

    /// Refuses new clips past the queue bound with `overloaded` and a retry hint.
    private func checkQueueRoom(for count: Int) throws(DecodeFailure) {
        guard case .running = phase else {
            throw DecodeFailure(.cancelled, "the supervisor is shutting down")
        }
        // Clips that go straight to an idle worker never wait, so they do not count.
        let waiting = queue.count + max(0, count - freeDecodeSlots)
        guard waiting <= configuration.queueLimit else {
            throw DecodeFailure(
                .overloaded, "\(queue.count) clips are queued (limit \(configuration.queueLimit)); retry later",
                retryAfterMs: 500)
        }
        if let failure = noWorkersFailure() { throw failure }
    }

    private func handleClip(_ fields: [String: JSONValue], id: Int, kind: ClipKind, from connection: Connection) throws(DecodeFailure) {
        let clip = try parseClip(fields, kind: kind, allowFD: true, from: connection)
        do throws(DecodeFailure) {
            try checkQueueRoom(for: 1)
        } catch {
            try? clip.clipFD?.close()
            throw error
        }
        let job = ClipJob(
            id: makeID(), connectionID: connection.id, requestID: id, clipIndex: nil,
            kind: kind == .decode ? .decode(clip.options) : .probe, path: clip.path, clipFD: clip.clipFD,
            deadlineMs: clip.deadlineMs, tag: clip.tag, threadsChosen: clip.threadsChosen)
        connection.pending[id] = .single(job.id)
        enqueue(job)
    }

    private func handleSample(_ fields: [String: JSONValue], id: Int, from connection: Connection) throws(DecodeFailure) {
        let reader = FieldReader(fields)
        guard let clipsValue = fields["clips"], let clipList = clipsValue.arrayValue else {
            throw FieldReader.invalid("clips", "missing or not an array")
        }
        guard !clipList.isEmpty, clipList.count <= configuration.maxSampleClips else {
            throw FieldReader.invalid("clips", "must hold 1 to \(configuration.maxSampleClips) clips, got \(clipList.count)")
        }
        let allOrNothing = try reader.bool("all_or_nothing") ?? true
        var defaults = fields
        for key in ["op", "id", "clips", "all_or_nothing"] { defaults.removeValue(forKey: key) }
        try rejectUnknownKeys(defaults, allowed: DecodeOptions.protocolKeys.union(["deadline_ms", "tag"]))
        var requests: [ClipRequest] = []
        for (index, item) in clipList.enumerated() {
            guard let clipFields = item.objectValue else {
                throw FieldReader.invalid("clips[\(index)]", "must be an object, got \(item.typeName)")
            }
            do throws(DecodeFailure) {
                requests.append(try parseClip(defaults.merging(clipFields) { _, clip in clip }, kind: .decode, allowFD: false, from: connection))
            } catch {
                var failure = error
                failure.message = "clips[\(index)]: \(failure.message)"
                if let field = failure.detail { failure.detail = "clips[\(index)].\(field)" }
                throw failure
            }
        }
        try checkQueueRoom(for: requests.count)
        let jobList = requests.enumerated().map { index, clip in
            ClipJob(
                id: makeID(), connectionID: connection.id, requestID: id, clipIndex: index,
                kind: .decode(clip.options), path: clip.path, clipFD: nil, deadlineMs: clip.deadlineMs, tag: clip.tag,
                threadsChosen: clip.threadsChosen)
        }
        let sample = SampleState(requestID: id, allOrNothing: allOrNothing, jobs: jobList.map(\.id))
        connection.pending[id] = .sample(sample)
        for job in jobList { enqueue(job) }
    }

    private func handleCancel(_ fields: [String: JSONValue], id: Int, from connection: Connection) throws(DecodeFailure) {
        try rejectUnknownKeys(fields, allowed: ["op", "id", "target"])
        guard let target = try FieldReader(fields).int("target", min: 0, max: 1 << 53) else {
            throw FieldReader.invalid("target", "missing")
        }
        var cancelled = false
        switch connection.pending[target] {
        case .single(let jobID):
            if let job = jobs[jobID] {
                cancel(job, message: "\(job.path): cancelled by the client")
                cancelled = true
            }
        case .sample(let sample):
            for jobID in sample.jobs {
                if let job = jobs[jobID] { cancel(job, message: "\(job.path): sample cancelled by the client") }
            }
            cancelled = true
        case nil:
            break
        }
        connection.enqueue(["id": .number(Double(id)), "ok": true, "cancelled": .bool(cancelled)])
    }

    /// Cancels a clip wherever it is: dropped from the queue, or its worker killed.
    func cancel(_ job: ClipJob, message: String) {
        switch job.state {
        case .answered:
            return
        case .queued:
            break
        case .running(let workerID, _):
            pool[workerID]?.kill(reason: "cancelled")
        }
        answer(job, .failed(DecodeFailure(.cancelled, message, path: job.path)))
    }

    func flush(_ connection: Connection) {
        guard connection.flush() else {
            drop(connection, reason: "write failed")
            return
        }
        if connection.outbox.isEmpty, connection.closeAfterFlush {
            drop(connection, reason: "protocol error")
            return
        }
        let wantsWritable = !connection.outbox.isEmpty
        // Back-pressure: past `pauseReadingAt` answers waiting to be written, requests are not
        // read until the client has taken most of them.
        var readingPaused = connection.readingPaused
        if connection.outbox.count >= Self.pauseReadingAt { readingPaused = true }
        if connection.outbox.count <= Self.pauseReadingAt / 4 { readingPaused = false }
        if wantsWritable != connection.wantsWritable || readingPaused != connection.readingPaused {
            connection.wantsWritable = wantsWritable
            connection.readingPaused = readingPaused
            try? poller.modify(connection.fd, .connection(connection.id), writable: wantsWritable, readable: !readingPaused)
        }
    }

    /// Forgets a connection: its clips are cancelled (workers killed), its fds closed.
    func drop(_ connection: Connection, reason: String) {
        guard connections.removeValue(forKey: connection.id) != nil else { return }
        poller.remove(connection.fd)
        for pending in connection.pending.values {
            switch pending {
            case .single(let jobID):
                if let job = jobs[jobID] { cancel(job, message: "\(job.path): the client disconnected") }
            case .sample(let sample):
                for jobID in sample.jobs {
                    if let job = jobs[jobID] { cancel(job, message: "\(job.path): the client disconnected") }
                }
            }
        }
        connection.pending.removeAll()
        connection.closeAll()
        slabs.dropConnection(connection.id)
        logger.debug("connection closed: \(reason)", metadata: ["client.pid": "\(connection.peer.pid)"])
    }
}

extension JSONValue {
    /// Adds the fields of `other` to an object (other wins).
    func merging(_ other: [String: JSONValue]) -> JSONValue {
        guard case .object(var fields) = self else { return self }
        for (key, value) in other { fields[key] = value }
        return .object(fields)
    }
}
