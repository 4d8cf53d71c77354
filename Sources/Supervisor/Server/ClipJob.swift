import Shared
import SystemPackage

typealias JobID = UInt64

/// One clip to decode or probe, from the moment it is accepted until it is answered.
final class ClipJob {
    enum Kind {
        case decode(DecodeOptions)
        case probe
    }

    enum State {
        case queued
        case running(worker: UInt64, since: Instant)
        case answered
    }

    let id: JobID
    let connectionID: UInt64
    let requestID: Int
    /// Index within a `sample`, nil for a single `decode`/`probe`.
    let clipIndex: Int?
    let kind: Kind
    /// The path as the client gave it (for fd requests, its name for messages and the log).
    let path: String
    /// The clip's fd when the client passed one; kept until the clip is answered, so that a clip
    /// retried after a crash (`crashRetry`) can be handed to the next worker too.
    var clipFD: FileDescriptor?
    let deadlineMs: Int
    let tag: String?
    /// The request chose `threads`; otherwise idle slots may become decoder threads.
    let threadsChosen: Bool
    let enqueuedAt: Instant
    var state: State = .queued
    /// Size and mtime of the file as the worker saw them when it took the clip (for the skip
    /// log and quarantine); nil until then, or when it hung before it could look.
    var fileSize: Int64?
    var fileMtime: Double?
    /// The quarantine entry sent with the job, so the worker can answer `quarantined` at once
    /// when the file is unchanged.
    var quarantine: QuarantineEntry?
    /// Set when the clip's worker crashed after it had refused bad media: the clip waits for a
    /// worker that never did, and is answered with this crash if none takes it in time.
    var crashRetry: CrashRetry?

    struct CrashRetry {
        /// The crash as it would have been answered.
        let failure: DecodeFailure
        /// The clip that worker had refused earlier: the other suspect.
        let refusedMedia: String
        let workerPID: Int32
        let since: Instant
    }

    init(
        id: JobID, connectionID: UInt64, requestID: Int, clipIndex: Int?, kind: Kind, path: String,
        clipFD: FileDescriptor?, deadlineMs: Int, tag: String?, threadsChosen: Bool = false
    ) {
        self.id = id
        self.connectionID = connectionID
        self.requestID = requestID
        self.clipIndex = clipIndex
        self.kind = kind
        self.path = path
        self.clipFD = clipFD
        self.deadlineMs = deadlineMs
        self.tag = tag
        self.threadsChosen = threadsChosen
        self.enqueuedAt = Instant.now()
    }

    var isQueued: Bool {
        if case .queued = state { return true }
        return false
    }

    var isAnswered: Bool {
        if case .answered = state { return true }
        return false
    }

    /// How many decoder threads this job may have when `idleSlots` decode slots would stay
    /// unused beside it: a video decode whose request left `threads` alone gets them (the worker
    /// uses them only on a dense selection), anything else gets 1.
    func threadBudget(idleSlots: Int) -> Int {
        guard idleSlots > 0, !threadsChosen, case .decode(let options) = kind, options.video else { return 1 }
        return min(1 + idleSlots, WorkerJob.maxThreadBudget)
    }

    /// The job as the worker gets it (docs/worker-protocol.md).
    func workerJob(roots: [String], threadBudget: Int = 1, staysAfterRefusedMedia: Bool = false, slabLimit: Int? = nil) -> WorkerJob {
        let operation: WorkerJob.Operation =
            switch kind {
            case .decode(let options): .decode(options)
            case .probe: .probe
            }
        return WorkerJob(
            id: id, operation: operation, path: path, passesFD: clipFD != nil, roots: roots,
            quarantine: quarantine.map {
                WorkerJob.Quarantine(size: $0.size, mtime: $0.mtime, reason: $0.reason, since: Timestamp.rfc3339(milliseconds: $0.sinceMs))
            }, threadBudget: threadBudget, staysAfterRefusedMedia: staysAfterRefusedMedia, slabLimit: slabLimit)
    }
}
