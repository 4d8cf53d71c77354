import Logging
import Shared

#if canImport(Glibc)
import Glibc
#endif

/// One line of the skip log (docs/skip-log.md): a clip-level skip, or an operator lifting
/// quarantine (`event: "forget"`).
struct SkipRecord: Equatable {
    enum Event: String { case skip, forget }

    var event: Event = .skip
    /// Milliseconds since the Unix epoch; written as RFC 3339 UTC with milliseconds.
    var timestampMs: Int64
    /// The clip; nil only for `forget` of everything.
    var path: String?
    var size: Int64?
    /// Modification time, seconds since the epoch with nanoseconds as the fraction.
    var mtime: Double?
    var reason: SkipReason?
    var detail: String = ""
    var elapsedMs: Int?
    var deadlineMs: Int?
    var requestID: Int?
    var tag: String?
    var clientPID: Int?
    var clientUID: Int?

    var json: JSONValue {
        var fields: [String: JSONValue] = ["ts": .string(Timestamp.rfc3339(milliseconds: timestampMs))]
        func put(_ key: String, _ value: JSONValue?) { fields[key] = value ?? .null }
        if event != .skip { fields["event"] = .string(event.rawValue) }
        put("path", path.map { .string($0) })
        if event == .skip {
            put("size", size.map { .number(Double($0)) })
            put("mtime", mtime.map { .number($0) })
            put("reason", reason.map { .string($0.rawValue) })
            put("detail", .string(detail))
            put("elapsed_ms", elapsedMs.map { .number(Double($0)) })
            put("deadline_ms", deadlineMs.map { .number(Double($0)) })
            put("request_id", requestID.map { .number(Double($0)) })
            put("tag", tag.map { .string($0) })
            put("client_pid", clientPID.map { .number(Double($0)) })
            put("client_uid", clientUID.map { .number(Double($0)) })
        }
        return .object(fields)
    }

    /// Reads a line written by `json`; nil for lines that are not records (a torn last line).
    init?(json: JSONValue) {
        guard let ts = json["ts"]?.stringValue, let ms = Timestamp.parseRFC3339(ts) else { return nil }
        timestampMs = ms
        event = json["event"]?.stringValue.flatMap(Event.init(rawValue:)) ?? .skip
        path = json["path"]?.stringValue
        if event == .skip {
            guard let reasonText = json["reason"]?.stringValue, let parsed = SkipReason(rawValue: reasonText) else { return nil }
            reason = parsed
        }
        size = json["size"]?.doubleValue.map { Int64($0) }
        mtime = json["mtime"]?.doubleValue
        detail = json["detail"]?.stringValue ?? ""
        elapsedMs = json["elapsed_ms"]?.intValue
        deadlineMs = json["deadline_ms"]?.intValue
        requestID = json["request_id"]?.intValue
        tag = json["tag"]?.stringValue
        clientPID = json["client_pid"]?.intValue
        clientUID = json["client_uid"]?.intValue
    }

    init(event: Event = .skip, timestampMs: Int64 = Timestamp.nowMilliseconds(), path: String?, reason: SkipReason? = nil) {
        self.event = event
        self.timestampMs = timestampMs
        self.path = path
        self.reason = reason
    }
}

/// RFC 3339 UTC timestamps with milliseconds, without Foundation.
enum Timestamp {
    static func nowMilliseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }

    static func rfc3339(milliseconds: Int64) -> String {
        var seconds = time_t(milliseconds / 1000)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ value: Int32, _ width: Int) -> String {
            let text = String(value)
            return String(repeating: "0", count: max(0, width - text.count)) + text
        }
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(milliseconds % 1000), 3))Z"
    }

    /// Parses what `rfc3339` writes (`YYYY-MM-DDTHH:MM:SS[.fff]Z`).
    static func parseRFC3339(_ text: String) -> Int64? {
        let bytes = Array(text.utf8)
        guard bytes.count >= 20, bytes.last == UInt8(ascii: "Z") else { return nil }
        func number(_ range: Range<Int>) -> Int32? {
            var value: Int32 = 0
            for i in range {
                guard i < bytes.count, bytes[i] >= 48, bytes[i] <= 57 else { return nil }
                value = value * 10 + Int32(bytes[i] - 48)
            }
            return value
        }
        guard let year = number(0..<4), let month = number(5..<7), let day = number(8..<10),
            let hour = number(11..<13), let minute = number(14..<16), let second = number(17..<19)
        else { return nil }
        var millis: Int64 = 0
        if bytes[19] == UInt8(ascii: ".") {
            guard let fraction = number(20..<(bytes.count - 1)) else { return nil }
            let digits = bytes.count - 21
            millis = Int64(fraction)
            if digits > 3 { for _ in 0..<(digits - 3) { millis /= 10 } }
            if digits < 3 { for _ in 0..<(3 - digits) { millis *= 10 } }
        }
        var parts = tm()
        parts.tm_year = year - 1900
        parts.tm_mon = month - 1
        parts.tm_mday = day
        parts.tm_hour = hour
        parts.tm_min = minute
        parts.tm_sec = second
        let seconds = timegm(&parts)
        return Int64(seconds) * 1000 + millis
    }

    /// "90s", "15m", "6h", "7d", "2w" → milliseconds.
    static func parseDuration(_ text: String) -> Int64? {
        guard let unit = text.last, let value = Double(text.dropLast()), value >= 0 else { return nil }
        let scale: Double
        switch unit {
        case "s": scale = 1000
        case "m": scale = 60_000
        case "h": scale = 3_600_000
        case "d": scale = 86_400_000
        case "w": scale = 604_800_000
        default: return nil
        }
        return Int64(value * scale)
    }
}

extension SkipRecord {
    /// `MESSAGE_ID=` of every skip's journal entry (`journalctl MESSAGE_ID=...`; catalog key).
    static let journalMessageID = "5c3f7a0e2b9d4e61a8c4d2f19b07e3a5"

    /// Every field of the record as log metadata; the journal handler turns `clip.path` into
    /// `CLIP_PATH`, `skip.reason` into `SKIP_REASON`, and so on (docs/systemd.md).
    var logMetadata: Logger.Metadata {
        var metadata: Logger.Metadata = ["message.id": "\(Self.journalMessageID)"]
        func put(_ key: String, _ value: CustomStringConvertible?) {
            if let value { metadata[key] = "\(value.description)" }
        }
        put("skip.reason", reason?.rawValue)
        put("clip.path", path)
        put("skip.detail", detail.isEmpty ? nil : detail)
        put("elapsed.ms", elapsedMs)
        put("deadline.ms", deadlineMs)
        put("request.id", requestID)
        put("tag", tag)
        put("client.pid", clientPID)
        put("client.uid", clientUID)
        put("clip.size", size)
        put("clip.mtime", mtime)
        return metadata
    }
}
