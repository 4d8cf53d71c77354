/// Why a clip was not decoded: the fixed set of DESIGN.md. A skip is a normal result that
/// travels to the client and the skip log, not an exception inside the supervisor.
public enum SkipReason: String, Sendable, Codable, CaseIterable, CustomStringConvertible {
    /// The worker ran past the clip's wall-clock deadline and was killed.
    case timeout
    /// The worker died from a signal (segfault in a codec, abort) while decoding the clip.
    case crashed
    /// An allocation failed, the address-space limit was hit, or the OOM killer struck.
    case outOfMemory = "out_of_memory"
    /// The media is damaged: FFmpeg could not demux or decode it.
    case decodeError = "decode_error"
    /// A container, codec or feature that this FFmpeg build cannot decode.
    case unsupported
    /// The source or the requested output exceeds the configured size limits.
    case tooLarge = "too_large"
    /// No such file.
    case notFound = "not_found"
    /// The file exists but may not be read (or lies outside the configured roots).
    case permission
    /// The clip failed before in a way that would fail again; answered without decoding.
    case quarantined
    /// The client, a sibling in an all-or-nothing sample, or shutdown cancelled the clip.
    case cancelled
    /// The queue is full or the clip waited too long for a worker; retry later.
    case overloaded
    /// The request itself is wrong (a field's type or range, a missing path).
    case invalidRequest = "invalid_request"

    public var description: String { rawValue }

    /// Whether a skip of this kind is a property of the clip and goes to the skip log.
    /// Infrastructure and caller outcomes (`overloaded`, `cancelled`, `invalid_request`) and
    /// repeats answered from quarantine are counted instead.
    public var isClipLevel: Bool {
        switch self {
        case .timeout, .crashed, .outOfMemory, .decodeError, .unsupported, .tooLarge, .notFound,
            .permission:
            true
        case .quarantined, .cancelled, .overloaded, .invalidRequest:
            false
        }
    }
}

/// A clip that could not be decoded: the reason, a human message that names the file, and
/// the detail underneath (FFmpeg's or the kernel's own words) where there is one.
public struct DecodeFailure: Error, Sendable, Equatable, Codable, CustomStringConvertible {
    public var reason: SkipReason
    public var message: String
    public var path: String?
    public var detail: String?
    /// For `overloaded`: when a retry has a chance, milliseconds.
    public var retryAfterMs: Int?

    public init(
        _ reason: SkipReason, _ message: String, path: String? = nil, detail: String? = nil, retryAfterMs: Int? = nil
    ) {
        self.reason = reason
        self.message = message
        self.path = path
        self.detail = detail
        self.retryAfterMs = retryAfterMs
    }

    public var description: String { "\(reason): \(message)" }

    /// The protocol's error object: `{"reason":..,"message":..,"path":..,"detail":..,"retry_after_ms":..}`.
    public var json: JSONValue {
        var fields: [String: JSONValue] = [
            "reason": .string(reason.rawValue), "message": .string(message),
        ]
        if let path { fields["path"] = .string(path) }
        if let detail { fields["detail"] = .string(detail) }
        if let retryAfterMs { fields["retry_after_ms"] = .number(Double(retryAfterMs)) }
        return .object(fields)
    }

    /// Reads the object written by `json`; nil when it is not one.
    public init?(json: JSONValue) {
        guard let reasonText = json["reason"]?.stringValue,
            let reason = SkipReason(rawValue: reasonText),
            let message = json["message"]?.stringValue
        else { return nil }
        self.init(
            reason, message, path: json["path"]?.stringValue, detail: json["detail"]?.stringValue,
            retryAfterMs: json["retry_after_ms"]?.intValue)
    }
}

/// What a failed clip leaves in the worker that reported it, and so whether that worker may
/// take the next clip. Both sides follow it: the worker to decide `exiting`, the supervisor to
/// know which later crash it cannot blame on the later clip alone (docs/worker-protocol.md,
/// "After a failed clip").
public enum WorkerAftermath: Sendable, Equatable {
    /// Nothing of the clip reached FFmpeg (no such file, no permission, quarantined): the
    /// worker stays as it was.
    case clean
    /// FFmpeg parsed the media and refused it. By default (DESIGN.md) the worker is replaced,
    /// in case the media left state behind. With `after_refused_media = "keep"` it stays, so a
    /// damaged clip does not cost a worker start and a cold first clip; since a decoder that read
    /// bad data might have damaged the heap without crashing, a later crash in such a worker is
    /// retried on a fresh worker before it is blamed on the clip it happened on.
    case suspect
    /// Anything else (memory ran out, or a failure nobody foresaw): the worker exits after
    /// its reply and is replaced.
    case replaced
}

extension SkipReason {
    /// What a failure of this kind, reported by a worker, says about the worker.
    public var workerAftermath: WorkerAftermath {
        switch self {
        case .notFound, .permission, .quarantined: .clean
        case .decodeError, .unsupported, .tooLarge, .invalidRequest: .suspect
        case .outOfMemory, .timeout, .crashed, .cancelled, .overloaded: .replaced
        }
    }
}
