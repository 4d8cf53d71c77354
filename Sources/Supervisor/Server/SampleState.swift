import Shared

/// The progress of one `sample` request: which clips are answered, the first failure, and the
/// final `done` message (docs/protocol.md, `sample`).
///
/// `record` turns one clip's outcome into what must happen next — the siblings to cancel under
/// all-or-nothing and the final message once every clip is answered — so that the supervisor's
/// answer path only sends what it is told, and the rules can be tested without processes.
final class SampleState {
    let requestID: Int
    let allOrNothing: Bool
    /// Job of each clip, by clip index.
    let jobs: [JobID]
    private(set) var answered: [Bool]
    private(set) var firstFailure: (clip: Int, failure: DecodeFailure)?
    /// The final message went out (cancelling siblings can complete the sample from within).
    private(set) var finished = false

    init(requestID: Int, allOrNothing: Bool, jobs: [JobID]) {
        self.requestID = requestID
        self.allOrNothing = allOrNothing
        self.jobs = jobs
        self.answered = Array(repeating: false, count: jobs.count)
    }

    var isComplete: Bool { answered.allSatisfy { $0 } }

    /// What one answered clip leads to.
    struct Consequences {
        /// Clips to cancel now (all-or-nothing after the first failure), by job.
        var cancel: [JobID] = []
        /// The reason to give them.
        var cancelMessage: ((String) -> String)?
        /// The final message, when this answer completed the sample.
        var done: JSONValue?
    }

    /// Records clip `clip`'s outcome (`failure` nil for success). Answers for a clip already
    /// recorded change nothing.
    func record(clip: Int, failure: DecodeFailure?) -> Consequences {
        var next = Consequences()
        guard answered.indices.contains(clip), !answered[clip] else { return next }
        answered[clip] = true
        if let failure, firstFailure == nil {
            firstFailure = (clip, failure)
            if allOrNothing {
                next.cancel = jobs.enumerated().filter { !answered[$0.offset] }.map(\.element)
                next.cancelMessage = { path in
                    "\(path): cancelled because clip \(clip) of the sample failed (\(failure.reason))"
                }
            }
        }
        if isComplete, !finished {
            finished = true
            next.done = doneMessage
        }
        return next
    }

    /// `{"id", "done": true, "clips": N, "ok"}`, with the first failure (`clip`, `error` naming
    /// the clip) when there was one.
    private var doneMessage: JSONValue {
        var done: [String: JSONValue] = [
            "id": .number(Double(requestID)), "done": true, "clips": .number(Double(jobs.count)),
        ]
        if let (clip, failure) = firstFailure {
            var summary = failure
            summary.message = "clip \(clip): \(failure.message)"
            done["ok"] = false
            done["error"] = summary.json
            done["clip"] = .number(Double(clip))
        } else {
            done["ok"] = true
        }
        return .object(done)
    }
}
