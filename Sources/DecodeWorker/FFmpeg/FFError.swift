import CFFmpeg
import Shared

#if canImport(Glibc)
import Glibc
#endif

/// Turns FFmpeg and kernel error codes into `DecodeFailure`s with a reason from the fixed set,
/// FFmpeg's own words, and the clip's path.
enum FFError {
    /// `av_strerror`: FFmpeg's text for an AVERROR code.
    static func text(_ code: Int32) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        let rc = buffer.withUnsafeMutableBufferPointer { av_strerror(code, $0.baseAddress, $0.count) }
        if rc < 0 { return "FFmpeg error \(code)" }
        return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    /// The skip reason for an AVERROR code returned while opening or decoding.
    static func reason(for code: Int32) -> SkipReason {
        switch code {
        case cffmpeg_averror(ENOENT), cffmpeg_averror(ENOTDIR): .notFound
        case cffmpeg_averror(EACCES), cffmpeg_averror(EPERM): .permission
        case CFFMPEG_AVERROR_ENOMEM: .outOfMemory
        case cffmpeg_averror(EISDIR): .unsupported
        case CFFMPEG_AVERROR_DEMUXER_NOT_FOUND, CFFMPEG_AVERROR_DECODER_NOT_FOUND,
            CFFMPEG_AVERROR_PATCHWELCOME, cffmpeg_averror(ENOSYS):
            .unsupported
        default: .decodeError
        }
    }

    /// A failure for an FFmpeg call that returned `code`. `detail` combines FFmpeg's message for
    /// the code with the error lines it logged since `logMark`.
    static func failure(
        _ code: Int32, _ doing: String, path: String, logMark: Int = 0, reason: SkipReason? = nil
    ) -> DecodeFailure {
        let reason = reason ?? Self.reason(for: code)
        let message = text(code)
        var detail = message
        if let logged = FFLog.summary(since: logMark) { detail += " | " + logged }
        return DecodeFailure(reason, "\(path): \(doing): \(message)", path: path, detail: detail)
    }

    /// Checks the file before FFmpeg sees it: a clearer message for a missing file, a directory,
    /// a socket or a device. A FIFO is allowed: a stream piped in is legitimate input, and one
    /// whose writer never comes blocks only this worker, which the supervisor kills at the deadline.
    static func checkInput(path: String) throws(DecodeFailure) {
        var info = stat()
        guard stat(path, &info) == 0 else {
            let err = errno
            let reason: SkipReason =
                switch err {
                case ENOENT, ENOTDIR, ELOOP, ENAMETOOLONG: .notFound
                case EACCES, EPERM: .permission
                default: .decodeError
                }
            let why = String(cString: strerror(err))
            throw DecodeFailure(reason, "\(path): \(why)", path: path, detail: "stat: \(why) (errno \(err))")
        }
        let kind = info.st_mode & S_IFMT
        if kind == S_IFDIR {
            throw DecodeFailure(.unsupported, "\(path): is a directory", path: path, detail: "is a directory")
        }
        if kind != S_IFREG, kind != S_IFIFO {
            throw DecodeFailure(
                .unsupported, "\(path): not a regular file or a FIFO", path: path,
                detail: "sockets and devices are not decoded")
        }
        guard access(path, R_OK) == 0 else {
            let err = errno
            let why = String(cString: strerror(err))
            throw DecodeFailure(
                err == EACCES || err == EPERM ? .permission : .decodeError, "\(path): \(why)", path: path,
                detail: "access: \(why) (errno \(err))")
        }
    }
}
