import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `clipvisor-worker serve`: the worker side of docs/worker-protocol.md. Single-threaded and
/// blocking by design: the supervisor enforces deadlines by killing this process, so nothing
/// here needs a timeout.
final class WorkerServer {
    struct Configuration: Sendable {
        var controlFD: Int32
        var parentPID: pid_t
        var maxClips: Int?
        var limits: Sandbox.Limits
        var landlock: WorkerMessage.LandlockMode
    }

    static let protocolVersion = 1

    private let config: Configuration
    private let faults: Faults
    private let control: FileDescriptor
    private var served = 0

    init(_ config: Configuration, faults: Faults) {
        self.config = config
        self.faults = faults
        control = FileDescriptor(rawValue: config.controlFD)
    }

    /// Runs until recycled; returns the exit code.
    func run() -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        Sandbox.defaultCrashSignals()
        if faults.exitAtStart {
            logLine("exiting at start (test fault exit-at-start)")
            return WorkerMessage.ExitCode.sandbox.rawValue
        }
        let landlock: Sandbox.LandlockOutcome
        do {
            try Sandbox.bindToParent(config.parentPID)
            landlock = try Sandbox.apply(limits: config.limits, landlock: config.landlock)
        } catch {
            logLine("cannot start: \(error.description)")
            return WorkerMessage.ExitCode.sandbox.rawValue
        }
        var ready: [String: JSONValue] = [
            "op": "ready", "pid": .number(Double(getpid())), "protocol": .number(Double(Self.protocolVersion)),
            "version": .string(WorkerCommand.version), "landlock": .number(Double(landlock.abi)),
        ]
        // Said to the supervisor, which tells the operator once, not once per worker.
        if let problem = landlock.problem { ready["landlock_problem"] = .string(problem) }
        // A supervisor that closed the channel before we were ready is shutting down: leave quietly.
        guard send(.object(ready), fd: nil, quietOnClosedPeer: true) else { return WorkerMessage.ExitCode.recycled.rawValue }

        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: WorkerMessage.maxSize + 1, alignment: 16)
        defer { buffer.deallocate() }
        while true {
            let received: SocketIO.Received
            do { received = try SocketIO.receive(control, into: buffer) } catch {
                logLine("control socket: \(error)")
                return WorkerMessage.ExitCode.protocolError.rawValue
            }
            let passed = received.fd.map(OwnedFD.init)
            if received.count == 0 { return WorkerMessage.ExitCode.recycled.rawValue }
            guard !received.truncated, received.count <= WorkerMessage.maxSize else {
                logLine("control socket: message truncated or above \(WorkerMessage.maxSize) bytes")
                return WorkerMessage.ExitCode.protocolError.rawValue
            }
            let message: JSONValue
            do { message = try JSONValue.parse(UnsafeRawBufferPointer(rebasing: buffer[0..<received.count])) } catch {
                logLine("control socket: \(error.message)")
                return WorkerMessage.ExitCode.protocolError.rawValue
            }
            guard let op = message["op"]?.stringValue, op == "decode" || op == "probe",
                let job = message["job"]?.intValue
            else {
                logLine("control socket: not a job message: \(String(message.jsonString.prefix(200)))")
                return WorkerMessage.ExitCode.protocolError.rawValue
            }
            let (reply, block) = handle(op: op, job: job, message: message, passed: passed)
            guard let delivered = deliver(reply, block: block, job: job, path: message["path"]?.stringValue ?? "") else {
                return WorkerMessage.ExitCode.protocolError.rawValue
            }
            if delivered["exiting"]?.boolValue == true { return WorkerMessage.ExitCode.recycled.rawValue }
        }
    }

    /// Runs one job and builds its `done` reply (with the block to attach, for a decode).
    func handle(op: String, job: Int, message: JSONValue, passed: OwnedFD?) -> (JSONValue, OwnedFD?) {
        served += 1
        let quotaReached = config.maxClips.map { served >= $0 } ?? false
        func failed(_ failure: DecodeFailure) -> (JSONValue, OwnedFD?) {
            (["op": "done", "job": .number(Double(job)), "ok": false, "error": failure.json, "exiting": true], nil)
        }
        let name = message["path"]?.stringValue ?? ""
        let openPath: String
        if message["fd"]?.boolValue == true {
            guard let fd = passed?.fd else {
                return failed(DecodeFailure(.invalidRequest, "\(name): the job says fd but no fd came with it", path: name, detail: "fd"))
            }
            openPath = "/proc/self/fd/\(fd.rawValue)"
        } else {
            guard !name.isEmpty else {
                return failed(DecodeFailure(.invalidRequest, "job \(job) has no path", detail: "path"))
            }
            openPath = name
        }
        let displayPath = name.isEmpty ? openPath : name
        let identity = FileIdentity(path: openPath)
        if faults.lies(about: displayPath) {
            // A size no Int64 holds, then a success without its block.
            _ = send(["op": "started", "job": .number(Double(job)), "size": 1e300, "mtime": .null], fd: nil)
            return (["op": "done", "job": .number(Double(job)), "ok": true, "result": [:], "block_bytes": 1000, "exiting": false], nil)
        }
        _ = send(["op": "started", "job": .number(Double(job)), "size": identity?.sizeJSON ?? .null, "mtime": identity?.mtimeJSON ?? .null], fd: nil)
        if let roots = message["roots"]?.arrayValue?.compactMap(\.stringValue), !roots.isEmpty,
            let failure = PathPolicy(roots: roots).check(openPath: openPath, displayPath: displayPath)
        {
            return failed(failure)
        }
        if let entry = message["quarantine"], let identity, identity.matches(entry) {
            let reason = entry["reason"]?.stringValue ?? "failed"
            let since = entry["since"]?.stringValue ?? "earlier"
            let failure = DecodeFailure(
                .quarantined,
                "\(displayPath): quarantined: it \(reason == "timeout" ? "timed out repeatedly" : reason) (since \(since)) and the file is unchanged; lift with `clipvisor skips --forget \(displayPath)`",
                path: displayPath, detail: reason)
            return (["op": "done", "job": .number(Double(job)), "ok": false, "error": failure.json, "exiting": .bool(quotaReached)], nil)
        }
        if let failure = faults.trigger(path: displayPath) { return failed(failure) }
        do {
            switch op {
            case "probe":
                let probe = try Prober.probe(path: openPath, displayPath: displayPath)
                return (["op": "done", "job": .number(Double(job)), "ok": true, "probe": probe, "exiting": .bool(quotaReached)], nil)
            default:
                let options = try DecodeOptions(json: message["options"]?.objectValue ?? [:])
                let clip = try ClipDecoder.decode(ClipRequest(path: openPath, displayPath: displayPath, options: options))
                let reply: JSONValue = [
                    "op": "done", "job": .number(Double(job)), "ok": true, "result": JSONCoding.encode(clip.result),
                    "block_bytes": .number(Double(clip.blockBytes)), "exiting": .bool(quotaReached),
                ]
                return (reply, clip.block)
            }
        } catch {
            return failed(error)
        }
    }

    /// Sends a job's reply; returns what was sent, or nil when the channel failed. A reply that
    /// cannot travel for reasons of its own (too big for the channel; the service user's fds in
    /// flight at their limit) is replaced by an error reply, so the clip is answered with the
    /// cause instead of the worker dying and the clip being counted as a crash.
    private func deliver(_ reply: JSONValue, block: OwnedFD?, job: Int, path: String) -> JSONValue? {
        let bytes = reply.serialized()
        let failure: DecodeFailure
        do {
            let sent = try bytes.withUnsafeBytes { raw throws(Errno) in try SocketIO.send(control, raw, passing: block?.fd) }
            return sent == bytes.count ? reply : nil
        } catch .messageTooLong {
            failure = DecodeFailure(
                .tooLarge, "\(path): the answer needs \(bytes.count) bytes, more than the worker channel carries (\(SocketIO.sendBufferBytes(control)))",
                path: path, detail: "answer_size")
        } catch .tooManyReferences {
            failure = DecodeFailure(
                .overloaded, "\(path): too many results are waiting to be read by clients; retry later", path: path, retryAfterMs: 500)
        } catch {
            logLine("control socket: sending \(bytes.count) bytes: \(error)")
            return nil
        }
        let replacement: JSONValue = ["op": "done", "job": .number(Double(job)), "ok": false, "error": failure.json, "exiting": true]
        return send(replacement, fd: nil) ? replacement : nil
    }

    private func send(_ value: JSONValue, fd: FileDescriptor?, quietOnClosedPeer: Bool = false) -> Bool {
        let bytes = value.serialized()
        do {
            let sent = try bytes.withUnsafeBytes { raw in try SocketIO.send(control, raw, passing: fd) }
            return sent == bytes.count
        } catch {
            let closed = (error as? Errno).map { $0 == .brokenPipe || $0 == .connectionReset } ?? false
            if !(quietOnClosedPeer && closed) { logLine("control socket: sending \(bytes.count) bytes: \(error)") }
            return false
        }
    }

    /// One line on stderr (the supervisor's): only worker-level problems, never clip chatter.
    private func logLine(_ text: String) {
        let line = Array("clipvisor-worker[\(getpid())]: \(text)\n".utf8)
        _ = try? line.withUnsafeBytes { try FileDescriptor.standardError.writeAll($0) }
    }
}

/// Size and modification time of the clip as the worker sees it when it takes the job: recorded
/// with any skip, and compared against a quarantine entry (a changed file is decoded again).
struct FileIdentity: Equatable {
    var size: Int64
    var mtime: Double

    init?(path: String) {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        size = Int64(info.st_size)
        mtime = Double(info.st_mtim.tv_sec) + Double(info.st_mtim.tv_nsec) / 1e9
    }

    var sizeJSON: JSONValue { .number(Double(size)) }
    var mtimeJSON: JSONValue { .number(mtime) }

    /// Whether a quarantine entry's size and mtime (as the supervisor recorded them) are ours.
    func matches(_ entry: JSONValue) -> Bool {
        guard let size = entry["size"]?.doubleValue, let mtime = entry["mtime"]?.doubleValue else {
            // Nothing was known about the file when it failed: only the path identifies it.
            return entry["size"] == .null || entry["size"] == nil
        }
        return Int64(size) == self.size && abs(mtime - self.mtime) < 1e-6
    }
}

/// The service's data roots (docs/worker-protocol.md): a clip must resolve, symlinks and `..`
/// followed, to a path inside one of them. Resolved here, in the worker, because resolving can
/// block on a dead network mount and the supervisor must never block.
struct PathPolicy {
    var roots: [String]

    func check(openPath: String, displayPath: String) -> DecodeFailure? {
        guard let real = Self.realPath(openPath) else {
            // A path that does not resolve is reported by the decode itself (not_found...).
            return nil
        }
        for root in roots {
            let resolvedRoot = Self.realPath(root) ?? root
            let prefix = resolvedRoot.hasSuffix("/") ? resolvedRoot : resolvedRoot + "/"
            if real == resolvedRoot || real.hasPrefix(prefix) { return nil }
        }
        return DecodeFailure(
            .permission, "\(displayPath): outside the data roots of this service (resolves to \(real))",
            path: displayPath, detail: "roots: \(roots.joined(separator: ", "))")
    }

    static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}
