import CFFmpeg
import Shared

/// An owned `AVFrame`.
final class Frame {
    let pointer: UnsafeMutablePointer<AVFrame>

    /// `path` names the clip in the error.
    init(path: String = "") throws(DecodeFailure) {
        guard let f = av_frame_alloc() else {
            let message = path.isEmpty ? "out of memory allocating a frame" : "\(path): out of memory allocating a frame"
            throw DecodeFailure(.outOfMemory, message, path: path.isEmpty ? nil : path)
        }
        pointer = f
    }

    deinit {
        var f: UnsafeMutablePointer<AVFrame>? = pointer
        av_frame_free(&f)
    }

    var pts: Int64? { pointer.pointee.pts == CFFMPEG_NOPTS_VALUE ? nil : pointer.pointee.pts }
    /// pts, else FFmpeg's best-effort guess.
    var anyPts: Int64? {
        if let pts { return pts }
        let guess = pointer.pointee.best_effort_timestamp
        return guess == CFFMPEG_NOPTS_VALUE ? nil : guess
    }
    var width: Int { Int(pointer.pointee.width) }
    var height: Int { Int(pointer.pointee.height) }
    var format: AVPixelFormat { AVPixelFormat(rawValue: pointer.pointee.format) }
    /// The decoder concealed errors in this frame (`AV_FRAME_FLAG_CORRUPT` or decode_error_flags).
    var isCorrupt: Bool {
        pointer.pointee.flags & AV_FRAME_FLAG_CORRUPT != 0 || pointer.pointee.decode_error_flags != 0
    }

    func unref() { av_frame_unref(pointer) }
}

extension Frame {
    /// Samples per channel in a decoded audio frame.
    var sampleCount: Int { Int(pointer.pointee.nb_samples) }
    var sampleRate: Int { Int(pointer.pointee.sample_rate) }
    var channelCount: Int { Int(pointer.pointee.ch_layout.nb_channels) }
    var sampleFormat: Int32 { pointer.pointee.format }

    /// A new reference to the same frame data (`av_frame_ref`), to hold a frame back or hand it
    /// to another thread; `path` names the clip in the error.
    func reference(path: String) throws(DecodeFailure) -> Frame {
        let copy = try Frame(path: path)
        let rc = av_frame_ref(copy.pointer, pointer)
        if rc < 0 { throw FFError.failure(rc, "referencing a decoded frame", path: path) }
        return copy
    }
}
