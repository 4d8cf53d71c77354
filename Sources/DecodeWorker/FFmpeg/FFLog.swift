import CFFmpeg
import Synchronization

/// FFmpeg's log, captured per clip instead of printed.
///
/// FFmpeg reports damage (a broken NAL unit, a truncated box) only through `av_log`; those
/// lines are what a failure's `detail` and a result's `partial_detail` quote. The callback is a
/// plain C function pointer that may run on any decoder thread, so the lines go into a `Mutex`.
/// Nothing is ever written to stderr: per-clip chatter would flood the supervisor's log.
enum FFLog {
    /// One captured line: FFmpeg's level (`AV_LOG_ERROR`...) and "[context] message".
    struct Line: Sendable, Equatable {
        var level: Int32
        var text: String
    }

    private struct State {
        var lines: [Line] = []
        var dropped = 0
        /// Bumped by `mark()`, so a caller can ask for the lines logged since a point.
        var total = 0
    }

    /// Lines kept per clip; later ones are counted, not stored (a fuzzed file can log millions).
    static let capacity = 200

    private static let state = Mutex(State())

    /// Installs the callback and the level (warnings and worse). Idempotent.
    static func install() {
        av_log_set_level(AV_LOG_WARNING)
        cffmpeg_set_log_callback(ffLogCallback)
    }

    /// Forgets every captured line: call at the start of each clip.
    static func reset() {
        state.withLock { $0 = State() }
    }

    /// A position in the log, for `errors(since:)`.
    static func mark() -> Int {
        state.withLock { $0.total }
    }

    /// Error-level lines (`AV_LOG_ERROR` and worse) logged after `mark`, deduplicated, in order.
    static func errors(since mark: Int = 0) -> [String] {
        state.withLock { s in
            let firstKept = s.total - s.lines.count
            var seen = Set<String>()
            var out: [String] = []
            for (offset, line) in s.lines.enumerated() where firstKept + offset >= mark {
                if line.level <= AV_LOG_ERROR, seen.insert(line.text).inserted { out.append(line.text) }
            }
            return out
        }
    }

    /// Number of error-level lines since `mark` (counting those beyond the capacity as errors too
    /// would overstate; they are reported through `dropped`).
    static func errorCount(since mark: Int) -> Int { errors(since: mark).count }

    /// Every kept line (warnings included) since `mark`.
    static func lines(since mark: Int = 0) -> [Line] {
        state.withLock { s in
            let firstKept = s.total - s.lines.count
            return s.lines.enumerated().filter { firstKept + $0.offset >= mark }.map(\.element)
        }
    }

    /// A short text for a failure's detail: the distinct error lines since `mark`, capped.
    static func summary(since mark: Int = 0, limit: Int = 8) -> String? {
        let errs = errors(since: mark)
        guard !errs.isEmpty else { return nil }
        var text = errs.prefix(limit).joined(separator: " | ")
        if errs.count > limit { text += " | (\(errs.count - limit) more)" }
        return text
    }

    fileprivate static func append(level: Int32, text: String) {
        state.withLock { s in
            s.total += 1
            if s.lines.count < capacity {
                s.lines.append(Line(level: level, text: text))
            } else {
                // Keep the window sliding so that "since mark" still finds recent lines.
                s.lines.removeFirst()
                s.lines.append(Line(level: level, text: text))
                s.dropped += 1
            }
        }
    }
}

/// The C callback given to `av_log_set_callback`. A global function (not a closure in
/// main.swift) so that it is never inferred `@MainActor`: FFmpeg calls it from its own threads.
private func ffLogCallback(
    _ avcl: UnsafeMutableRawPointer?, _ level: Int32, _ format: UnsafePointer<CChar>?,
    _ arguments: CVaListPointer?
) {
    guard level <= AV_LOG_WARNING, let format, let arguments else { return }
    var buffer = [CChar](repeating: 0, count: 1024)
    var printPrefix: Int32 = 0
    let written = buffer.withUnsafeMutableBufferPointer { out in
        cffmpeg_format_log_line(avcl, level, format, arguments, out.baseAddress, Int32(out.count), &printPrefix)
    }
    guard written >= 0 else { return }
    var message = buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    while let last = message.last, last == "\n" || last == "\r" || last == " " { message.removeLast() }
    guard !message.isEmpty else { return }
    var context: String?
    if let name = cffmpeg_log_context_name(avcl) { context = String(cString: name) }
    let text = context.map { "[\($0)] \(message)" } ?? message
    FFLog.append(level: level, text: text)
}
