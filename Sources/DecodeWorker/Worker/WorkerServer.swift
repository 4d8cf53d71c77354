import CClipvisorShims
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

    private let config: Configuration
    private let faults: Faults
    private let control: FileDescriptor
    private var served = 0
    /// Test fault `poison-on`: a refused clip left this worker to crash on its next one.
    private var poisoned = false

    init(_ config: Configuration, faults: Faults) {
        self.config = config
        self.faults = faults
        control = FileDescriptor(rawValue: config.controlFD)
    }

    /// Runs until recycled; returns the exit code.
    func run() -> Int32 {
        guard let landlock = enterSandbox() else { return WorkerMessage.ExitCode.sandbox.rawValue }
        return serve(landlock: landlock)
    }

    /// Binds the worker to its parent and applies the sandbox, on the calling thread and so to
    /// every thread started after it; nil (logged) when the worker cannot start and must exit
    /// with `ExitCode.sandbox`.
    func enterSandbox() -> Sandbox.LandlockOutcome? {
        signal(SIGPIPE, SIG_IGN)
        Sandbox.defaultCrashSignals()
        if faults.exitAtStart {
            logLine("exiting at start (test fault exit-at-start)")
            return nil
        }
        do {
            try Sandbox.bindToParent(config.parentPID)
            return try Sandbox.apply(limits: config.limits, landlock: config.landlock)
        } catch {
            logLine("cannot start: \(error.description)")
            return nil
        }
    }

    /// This thread's id when it is not the process's first thread (ForkServer.swift), else nil.
    private static func servingThread() -> Int32? {
        let thread = cv_gettid()
        return thread == getpid() ? nil : thread
    }

    /// Says `ready` and serves jobs until recycled; returns the exit code.
    func serve(landlock: Sandbox.LandlockOutcome) -> Int32 {
        // The Landlock problem is said to the supervisor, which tells the operator once.
        let ready = WorkerReply.ready(.init(
            pid: getpid(), protocolVersion: ClipvisorVersion.workerProtocol, version: WorkerCommand.version,
            landlockABI: Int(landlock.abi), landlockProblem: landlock.problem, thread: Self.servingThread()))
        // A supervisor that closed the channel before we were ready is shutting down: leave quietly.
        guard send(ready.json, fd: nil, quietOnClosedPeer: true) else { return WorkerMessage.ExitCode.recycled.rawValue }

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
            let job: WorkerJob
            do {
                job = try WorkerJob(json: try JSONValue.parse(UnsafeRawBufferPointer(rebasing: buffer[0..<received.count])))
            } catch let error as WorkerProtocolError {
                logLine("control socket: \(error)")
                return WorkerMessage.ExitCode.protocolError.rawValue
            } catch {
                logLine("control socket: \(error)")
                return WorkerMessage.ExitCode.protocolError.rawValue
            }
            let (outcome, block, exiting) = handle(job, passed: passed)
            // Closed before the reply: once the supervisor reads it, this worker holds nothing
            // of a slab that may go to the client and then to another worker.
            try? passed?.release()?.close()
            guard let delivered = deliver(.done(job: job.id, outcome: outcome, exiting: exiting), block: block, path: job.path)
            else { return WorkerMessage.ExitCode.protocolError.rawValue }
            if case .done(_, _, true) = delivered { return WorkerMessage.ExitCode.recycled.rawValue }
        }
    }

    /// Runs one job: its outcome, the block to attach for a decode, and whether the worker exits
    /// after the reply (its quota is reached, or the job failed in a way that may have left state
    /// behind: `SkipReason.workerAftermath`).
    func handle(_ job: WorkerJob, passed: OwnedFD?) -> (WorkerReply.Outcome, OwnedFD?, exiting: Bool) {
        served += 1
        let quotaReached = config.maxClips.map { served >= $0 } ?? false
        func failed(_ failure: DecodeFailure) -> (WorkerReply.Outcome, OwnedFD?, exiting: Bool) {
            (.failed(failure), nil, Self.mustExit(after: failure, staysAfterRefusedMedia: job.staysAfterRefusedMedia) || quotaReached)
        }
        let name = job.path
        // The fd that came with the job: the clip itself, or the block slab to write into.
        let slab = job.slabLimit.flatMap { limit in passed?.fd.map { (fd: $0, limit: limit) } }
        if job.slabLimit != nil, slab == nil {
            return failed(DecodeFailure(.invalidRequest, "\(name): the job says slab_limit but no slab came with it", path: name, detail: "slab"))
        }
        let openPath: String
        if job.passesFD {
            guard let fd = passed?.fd else {
                return failed(DecodeFailure(.invalidRequest, "\(name): the job says fd but no fd came with it", path: name, detail: "fd"))
            }
            openPath = "/proc/self/fd/\(fd.rawValue)"
        } else {
            guard !name.isEmpty else {
                return failed(DecodeFailure(.invalidRequest, "job \(job.id) has no path", detail: "path"))
            }
            openPath = name
        }
        let displayPath = name.isEmpty ? openPath : name
        let identity = FileIdentity(path: openPath)
        if faults.lies(about: displayPath) {
            // A size no Int64 holds, then a success without its block: raw JSON, since the typed
            // messages cannot say these things.
            _ = send(["op": "started", "job": .number(Double(job.id)), "size": 1e300, "mtime": .null], fd: nil)
            return (.decoded(blockBytes: 1000), nil, false)
        }
        _ = send(WorkerReply.started(job: job.id, size: identity?.size, mtime: identity?.mtime).json, fd: nil)
        if !job.roots.isEmpty, let failure = PathPolicy(roots: job.roots).check(openPath: openPath, displayPath: displayPath) {
            return failed(failure)
        }
        if let entry = job.quarantine, let identity, identity.matches(entry) {
            let reason = entry.reason.rawValue
            let failure = DecodeFailure(
                .quarantined,
                "\(displayPath): quarantined: it \(entry.reason == .timeout ? "timed out repeatedly" : reason) (since \(entry.since)) and the file is unchanged; lift with `clipvisor skips --forget \(displayPath)`",
                path: displayPath, detail: reason)
            return failed(failure)  // nothing was decoded: the worker stays (`WorkerAftermath.clean`)
        }
        if poisoned { Faults.crash() }
        if faults.poisons(displayPath) {
            poisoned = true
            return failed(DecodeFailure(
                .decodeError, "\(displayPath): refused (test fault poison-on); this worker crashes on its next clip",
                path: displayPath, detail: "CLIPVISOR_TEST_FAULTS"))
        }
        if let failure = faults.trigger(path: displayPath) { return failed(failure) }
        do {
            switch job.operation {
            case .probe:
                return (.probed(try Prober.probe(path: openPath, displayPath: displayPath)), nil, quotaReached)
            case .decode(let options):
                let clip = try ClipDecoder.decode(ClipRequest(
                    path: openPath, displayPath: displayPath, options: options, threadBudget: job.threadBudget, slab: slab))
                return (.decoded(blockBytes: clip.blockBytes, inSlab: clip.block == nil), clip.block, quotaReached)
            }
        } catch {
            return failed(error)
        }
    }

    /// Whether the worker must be replaced after `failure` (`SkipReason.workerAftermath`). A
    /// file that could not be opened never reached a demuxer, so the worker stays: a dataset
    /// with many missing files does not pay a worker start for each. Media that FFmpeg refused
    /// replaces it, in case the media left state behind, unless the supervisor asks it to stay
    /// (`after_refused_media = "keep"`). Running out of memory, or anything unforeseen, replaces it.
    static func mustExit(after failure: DecodeFailure, staysAfterRefusedMedia: Bool) -> Bool {
        switch failure.reason.workerAftermath {
        case .clean: false
        case .suspect: !staysAfterRefusedMedia
        case .replaced: true
        }
    }

    /// Sends a job's reply; returns what was sent, or nil when the channel failed. A reply that
    /// cannot travel for reasons of its own (too big for the channel; the service user's fds in
    /// flight at their limit) is replaced by an error reply, so the clip is answered with the
    /// cause instead of the worker dying and the clip being counted as a crash.
    private func deliver(_ reply: WorkerReply, block: OwnedFD?, path: String) -> WorkerReply? {
        guard case .done(let job, _, _) = reply else { return send(reply.json, fd: nil) ? reply : nil }
        let bytes = reply.json.serialized()
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
        let replacement = WorkerReply.done(job: job, outcome: .failed(failure), exiting: true)
        return send(replacement.json, fd: nil) ? replacement : nil
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

    /// Whether a quarantine entry's size and mtime (as the supervisor recorded them) are ours.
    func matches(_ entry: WorkerJob.Quarantine) -> Bool {
        guard let size = entry.size, let mtime = entry.mtime else {
            // Nothing was known about the file when it failed: only the path identifies it.
            return entry.size == nil
        }
        return size == self.size && abs(mtime - self.mtime) < 1e-6
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
