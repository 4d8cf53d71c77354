/// Messages between the supervisor and a decode worker (docs/worker-protocol.md). They travel
/// as one JSON object per SOCK_SEQPACKET datagram, so the kernel keeps message boundaries and
/// an fd (a clip passed by a client, or the finished block) rides with its message.
public enum WorkerMessage {
    /// Largest datagram either side accepts, and the buffer size the supervisor asks for the
    /// channel: the largest job (`DecodeOptions.maxFramesPerClip` timestamps of at most 24
    /// characters each, a path of up to 4 KiB, the data roots) with room to spare. Replies are
    /// small since the decode result travels only in the block. The kernel may grant less (see
    /// `cv_unix_seqpacket_pair`): a job that still does not fit is refused alone.
    public static let maxSize = DecodeOptions.maxFramesPerClip * 24 + (64 << 10)

    /// Exit codes of `clipvisor-worker serve`, documented so the supervisor can tell a clean
    /// recycle from a start-up failure.
    public enum ExitCode: Int32, Sendable {
        /// Served its clip quota or saw its control socket close.
        case recycled = 0
        /// Bad command line (a supervisor/worker version mismatch).
        case usage = 64
        /// Could not apply its limits or sandbox at start.
        case sandbox = 71
        /// The control socket failed or sent a malformed message.
        case protocolError = 76
    }

    /// What a worker does about Landlock, its file-system write ban (docs/worker-protocol.md,
    /// "Spawning"). The config file's `sandbox` key and `clipvisor-worker serve --landlock`.
    public enum LandlockMode: String, Sendable, CaseIterable {
        /// Apply it where the kernel and the container allow; where they refuse (a kernel
        /// without Landlock, a seccomp filter that answers EPERM, as container runtimes do),
        /// decode with the remaining limits and say why in `ready`.
        case auto
        /// Refuse to serve without it: the worker exits 71 and no clip is decoded.
        case required
        /// Do not apply it (debugging, and tests of the sandbox itself).
        case off
    }

    /// Environment variable that turns on test-only fault switches in workers. Only whoever
    /// starts the supervisor can set it; no request can.
    public static let faultEnvironmentKey = "CLIPVISOR_TEST_FAULTS"
}

/// A worker-channel message that does not have the shape docs/worker-protocol.md gives it.
/// Either side treats it as a protocol violation: the worker exits 76, the supervisor kills the
/// worker (its messages are untrusted: a worker may be compromised by the media it decodes).
public struct WorkerProtocolError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Supervisor → worker: one clip to decode or probe (docs/worker-protocol.md, "Messages").
public struct WorkerJob: Sendable {
    public enum Operation: Sendable {
        /// Options already validated by the supervisor (`DecodeOptions(json:)`, the one place
        /// request fields are checked); the worker decodes them back without a second policy.
        case decode(DecodeOptions)
        case probe
    }

    /// What the supervisor knows of a quarantined clip: the worker answers `quarantined` at once
    /// when the file's size and mtime are still these.
    public struct Quarantine: Sendable, Equatable {
        public var size: Int64?
        public var mtime: Double?
        public var reason: SkipReason
        /// RFC 3339, for the message.
        public var since: String

        public init(size: Int64?, mtime: Double?, reason: SkipReason, since: String) {
            self.size = size
            self.mtime = mtime
            self.reason = reason
            self.since = since
        }
    }

    public var id: UInt64
    public var operation: Operation
    /// The clip's path; with `passesFD` the file itself is the fd attached to the message, and
    /// the path only names it in messages.
    public var path: String
    public var passesFD: Bool
    /// The service's data roots; empty for no path policy.
    public var roots: [String]
    public var quarantine: Quarantine?
    /// Decoder threads the worker may use for a dense selection (most frames of the range) when
    /// the request did not choose `threads`: the supervisor gives a clip the decode slots that
    /// would otherwise stay idle (one caller on an idle pool). 1: no more than the request says.
    public var threadBudget: Int
    public static let maxThreadBudget = 8
    /// After media it refuses (`WorkerAftermath.suspect`) the worker stays instead of exiting
    /// (`after_refused_media = "keep"`); false keeps DESIGN.md's rule: replaced after any error.
    public var staysAfterRefusedMedia: Bool
    /// With a block slab attached instead of a clip's fd (docs/worker-protocol.md, "Block
    /// slabs"): the most bytes the block may take in it. A block that outgrows it moves to a
    /// fresh memfd; nil: a fresh memfd from the start.
    public var slabLimit: Int?

    public init(
        id: UInt64, operation: Operation, path: String, passesFD: Bool, roots: [String], quarantine: Quarantine?,
        threadBudget: Int = 1, staysAfterRefusedMedia: Bool = false, slabLimit: Int? = nil
    ) {
        self.id = id
        self.operation = operation
        self.path = path
        self.passesFD = passesFD
        self.roots = roots
        self.quarantine = quarantine
        self.threadBudget = threadBudget
        self.staysAfterRefusedMedia = staysAfterRefusedMedia
        self.slabLimit = slabLimit
    }

    public var json: JSONValue {
        var message: [String: JSONValue] = ["job": .number(Double(id)), "path": .string(path)]
        switch operation {
        case .decode(let options):
            message["op"] = "decode"
            message["options"] = .object(options.json)
        case .probe:
            message["op"] = "probe"
        }
        if passesFD { message["fd"] = true }
        if threadBudget > 1 { message["thread_budget"] = .number(Double(threadBudget)) }
        if staysAfterRefusedMedia { message["stay_after_refused_media"] = true }
        if let slabLimit { message["slab_limit"] = .number(Double(slabLimit)) }
        if !roots.isEmpty { message["roots"] = .array(roots.map { .string($0) }) }
        if let quarantine {
            message["quarantine"] = [
                "size": quarantine.size.map { .number(Double($0)) } ?? .null,
                "mtime": quarantine.mtime.map { .number($0) } ?? .null,
                "reason": .string(quarantine.reason.rawValue), "since": .string(quarantine.since),
            ]
        }
        return .object(message)
    }

    public init(json: JSONValue) throws(WorkerProtocolError) {
        guard let id = json["job"]?.intValue.flatMap(UInt64.init(exactly:)) else {
            throw WorkerProtocolError("a job without a job number: \(json.jsonString.prefix(200))")
        }
        switch json["op"]?.stringValue {
        case "decode":
            do {
                operation = .decode(try DecodeOptions(json: json["options"]?.objectValue ?? [:]))
            } catch {
                throw WorkerProtocolError("job \(id): options the supervisor should have refused: \(error.message)")
            }
        case "probe":
            operation = .probe
        default:
            throw WorkerProtocolError("job \(id): unknown operation \(json["op"]?.jsonString ?? "(none)")")
        }
        self.id = id
        path = json["path"]?.stringValue ?? ""
        passesFD = json["fd"]?.boolValue ?? false
        threadBudget = min(max(json["thread_budget"]?.intValue ?? 1, 1), Self.maxThreadBudget)
        staysAfterRefusedMedia = json["stay_after_refused_media"]?.boolValue ?? false
        if let limit = json["slab_limit"] {
            guard let bytes = limit.intValue, bytes > 0, !passesFD else {
                throw WorkerProtocolError("job \(id): slab_limit \(limit.jsonString) with\(passesFD ? " a clip fd" : "out a positive size")")
            }
            slabLimit = bytes
        }
        roots = json["roots"]?.arrayValue?.compactMap(\.stringValue) ?? []
        quarantine = json["quarantine"].flatMap { entry -> Quarantine? in
            guard let reason = entry["reason"]?.stringValue.flatMap(SkipReason.init(rawValue:)) else { return nil }
            return Quarantine(
                size: entry["size"]?.doubleValue.flatMap { Int64(exactly: $0) }, mtime: entry["mtime"]?.doubleValue,
                reason: reason, since: entry["since"]?.stringValue ?? "earlier")
        }
    }
}

/// Worker → supervisor (docs/worker-protocol.md, "Messages"). Read by the supervisor from an
/// untrusted peer: numbers out of range are refused, never trapped on.
public enum WorkerReply: Sendable {
    /// Once, at start, after the sandbox is in force.
    case ready(Ready)
    /// The worker took the job and looked at the file (for the skip log and the quarantine).
    case started(job: UInt64, size: Int64?, mtime: Double?)
    /// Exactly one per job.
    case done(job: UInt64, outcome: Outcome, exiting: Bool)

    public struct Ready: Sendable, Equatable {
        public var pid: Int32
        public var protocolVersion: Int
        public var version: String
        /// The Landlock ABI in force; 0 when file-system writes are not restricted.
        public var landlockABI: Int
        /// Why the write ban is not in force (`--landlock auto` where it was refused).
        public var landlockProblem: String?
        /// The thread that serves jobs, when it is not the process's first thread (a clone of the
        /// fork server serves from a thread of its own): the supervisor reads whether the worker
        /// is blocked, and its finest CPU clock, from that thread.
        public var thread: Int32?

        public init(pid: Int32, protocolVersion: Int, version: String, landlockABI: Int, landlockProblem: String?,
                    thread: Int32? = nil) {
            self.pid = pid
            self.protocolVersion = protocolVersion
            self.version = version
            self.landlockABI = landlockABI
            self.landlockProblem = landlockProblem
            self.thread = thread
        }
    }

    public enum Outcome: Sendable {
        /// The block, a sealed memfd of `blockBytes` bytes, rides with the message; or, when
        /// `inSlab`, it fills the first `blockBytes` bytes of the slab the job came with, and no
        /// fd rides. The result travels once, in the block's header (docs/block-format.md).
        case decoded(blockBytes: Int, inSlab: Bool = false)
        case probed(JSONValue)
        case failed(DecodeFailure)
    }

    public var json: JSONValue {
        switch self {
        case .ready(let ready):
            var message: [String: JSONValue] = [
                "op": "ready", "pid": .number(Double(ready.pid)), "protocol": .number(Double(ready.protocolVersion)),
                "version": .string(ready.version), "landlock": .number(Double(ready.landlockABI)),
            ]
            if let problem = ready.landlockProblem { message["landlock_problem"] = .string(problem) }
            if let thread = ready.thread { message["thread"] = .number(Double(thread)) }
            return .object(message)
        case .started(let job, let size, let mtime):
            return [
                "op": "started", "job": .number(Double(job)), "size": size.map { .number(Double($0)) } ?? .null,
                "mtime": mtime.map { .number($0) } ?? .null,
            ]
        case .done(let job, let outcome, let exiting):
            var message: [String: JSONValue] = ["op": "done", "job": .number(Double(job)), "exiting": .bool(exiting)]
            switch outcome {
            case .decoded(let bytes, let inSlab):
                message["ok"] = true
                message["block_bytes"] = .number(Double(bytes))
                if inSlab { message["in_slab"] = true }
            case .probed(let probe):
                message["ok"] = true
                message["probe"] = probe
            case .failed(let failure):
                message["ok"] = false
                message["error"] = failure.json
            }
            return .object(message)
        }
    }

    public init(json: JSONValue) throws(WorkerProtocolError) {
        func job() throws(WorkerProtocolError) -> UInt64 {
            guard let job = json["job"]?.intValue.flatMap(UInt64.init(exactly:)) else {
                throw WorkerProtocolError("a \(json["op"]?.stringValue ?? "message") without a valid job number")
            }
            return job
        }
        switch json["op"]?.stringValue {
        case "ready":
            guard let pid = json["pid"]?.intValue.flatMap(Int32.init(exactly:)), let version = json["protocol"]?.intValue else {
                throw WorkerProtocolError("a ready message without pid or protocol")
            }
            self = .ready(Ready(
                pid: pid, protocolVersion: version, version: json["version"]?.stringValue ?? "?",
                landlockABI: json["landlock"]?.intValue ?? 0,
                landlockProblem: json["landlock_problem"]?.stringValue.map { String($0.prefix(500)) },
                thread: json["thread"]?.intValue.flatMap(Int32.init(exactly:)).flatMap { $0 > 0 ? $0 : nil }))
        case "started":
            self = .started(
                job: try job(), size: json["size"]?.doubleValue.flatMap { Int64(exactly: $0) },
                mtime: json["mtime"]?.doubleValue.flatMap { $0.isFinite ? $0 : nil })
        case "done":
            let job = try job()
            let outcome: Outcome
            if json["ok"]?.boolValue == true {
                if let bytes = json["block_bytes"]?.intValue {
                    guard bytes > 0 else { throw WorkerProtocolError("job \(job): a block of \(bytes) bytes") }
                    outcome = .decoded(blockBytes: bytes, inSlab: json["in_slab"]?.boolValue ?? false)
                } else if let probe = json["probe"] {
                    outcome = .probed(probe)
                } else {
                    throw WorkerProtocolError("job \(job): a success with neither a block nor a probe")
                }
            } else {
                guard let failure = json["error"].flatMap(DecodeFailure.init(json:)) else {
                    throw WorkerProtocolError("job \(job): an error the supervisor cannot read")
                }
                outcome = .failed(failure)
            }
            self = .done(job: job, outcome: outcome, exiting: json["exiting"]?.boolValue ?? true)
        default:
            throw WorkerProtocolError("an unknown message \(json["op"]?.jsonString ?? "without op")")
        }
    }
}
