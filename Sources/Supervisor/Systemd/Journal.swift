import CSystemd
import Logging
import Shared

#if canImport(Glibc)
import Glibc
#endif

/// Where operator-facing logs go: the journal as structured entries, or plain stderr lines.
enum LogTarget: String, CaseIterable, Sendable {
    /// The journal when stderr is the journal's stream (`JOURNAL_STREAM` matches fd 2, as
    /// systemd sets it for `StandardError=journal`) and the journal socket exists; else stderr.
    case auto
    /// Always the journal (when its socket exists; stderr otherwise, since sd_journal_sendv
    /// would drop everything silently).
    case journal
    /// Always stderr.
    case stderr
}

/// journald's native protocol through sd_journal_sendv(3).
enum Journal {
    static let socketPath = "/run/systemd/journal/socket"
    /// `SYSLOG_IDENTIFIER=` of every entry, so `journalctl -t clipvisor` finds them.
    static let identifier = "clipvisor"

    /// Whether journald's socket exists. sd_journal_sendv returns success and drops the entry
    /// when it does not, so nothing may rely on the journal without this check.
    static var socketExists: Bool {
        var info = stat()
        return stat(socketPath, &info) == 0 && (info.st_mode & S_IFMT) == S_IFSOCK
    }

    /// Whether fd 2 is the stream systemd connected to the journal: `JOURNAL_STREAM` is
    /// `DEVICE:INODE` of that stream, and a child whose stderr was redirected must not trust it.
    static var stderrIsJournalStream: Bool {
        guard let value = SocketDiscovery.environment("JOURNAL_STREAM") else { return false }
        let parts = value.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var info = stat()
        guard fstat(2, &info) == 0 else { return false }
        return UInt64(info.st_dev) == device && UInt64(info.st_ino) == inode
    }

    /// Whether this process should log to the journal under `target`.
    static func shouldUse(_ target: LogTarget) -> Bool {
        switch target {
        case .stderr: false
        case .journal: socketExists
        case .auto: stderrIsJournalStream && socketExists
        }
    }

    /// A journal field name from a metadata key: `clip.path` → `CLIP_PATH`. Only `A-Z`, `0-9`
    /// and `_`, not starting with `_` (trusted fields) or a digit, at most 64 characters.
    static func fieldName(_ key: String) -> String {
        var name = String(key.uppercased().unicodeScalars.map { scalar -> Character in
            let c = Character(scalar)
            return (("A"..."Z").contains(c) || ("0"..."9").contains(c)) ? c : "_"
        })
        while name.first == "_" || name.first?.isNumber == true { name.removeFirst() }
        if name.isEmpty { name = "FIELD" }
        return String(name.prefix(64))
    }

    /// Sends one entry of `FIELD=value` pairs (values may hold newlines; libsystemd switches to
    /// the binary form for them). Returns 0 or a negative errno, like sd_journal_sendv.
    @discardableResult
    static func send(_ fields: [(String, String)]) -> Int32 {
        var buffer: [UInt8] = []
        var ranges: [Range<Int>] = []
        for (name, value) in fields {
            let start = buffer.count
            buffer.append(contentsOf: name.utf8)
            buffer.append(UInt8(ascii: "="))
            buffer.append(contentsOf: value.utf8)
            ranges.append(start..<buffer.count)
        }
        return buffer.withUnsafeMutableBytes { raw -> Int32 in
            var vectors = ranges.map { range in
                iovec(iov_base: raw.baseAddress! + range.lowerBound, iov_len: range.count)
            }
            return vectors.withUnsafeMutableBufferPointer { sd_journal_sendv($0.baseAddress, Int32($0.count)) }
        }
    }

    /// syslog priority of a swift-log level (`PRIORITY=`).
    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }
}

/// A swift-log handler that writes structured journal entries: `MESSAGE`, `PRIORITY`,
/// `SYSLOG_IDENTIFIER=clipvisor`, the source location, and every metadata key as an uppercase
/// field (`worker.pid` → `WORKER_PID`), so `journalctl WORKER_PID=812` works.
struct JournalLogHandler: LogHandler {
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .info
    let label: String

    init(label: String) {
        self.label = label
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var fields: [(String, String)] = [
            ("MESSAGE", event.message.description),
            ("PRIORITY", String(Journal.priority(event.level))),
            ("SYSLOG_IDENTIFIER", Journal.identifier),
            ("CODE_FILE", event.file),
            ("CODE_LINE", String(event.line)),
            ("CODE_FUNC", event.function),
        ]
        var merged = metadata
        if let extra = event.metadata { merged.merge(extra) { $1 } }
        for key in merged.keys.sorted() {
            fields.append((Journal.fieldName(key), "\(merged[key]!)"))
        }
        Journal.send(fields)
    }
}
