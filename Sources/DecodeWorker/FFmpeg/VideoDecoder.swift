import CFFmpeg
import Shared

/// An owned `AVFrame`.
final class Frame {
    let pointer: UnsafeMutablePointer<AVFrame>

    init() throws(DecodeFailure) {
        guard let f = av_frame_alloc() else { throw DecodeFailure(.outOfMemory, "out of memory allocating a frame") }
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

/// An opened video decoder (`AVCodecContext`) for one stream.
final class VideoDecoder {
    let context: UnsafeMutablePointer<AVCodecContext>
    let codecName: String

    /// Opens the stream's decoder with `threads` threads (0: FFmpeg's choice) and FFmpeg's own
    /// `max_pixels` limit, so that a frame size change mid-stream cannot exceed it either.
    init(stream st: UnsafeMutablePointer<AVStream>, threads: Int, maxPixels: Int, path: String) throws(DecodeFailure) {
        let par = st.pointee.codecpar!
        let codecID = par.pointee.codec_id
        guard let codec = avcodec_find_decoder(codecID) else {
            let name = avcodec_get_name(codecID).map { String(cString: $0) } ?? "unknown"
            throw DecodeFailure(
                .unsupported, "\(path): no decoder for the video codec '\(name)' in this FFmpeg build",
                path: path, detail: "avcodec_find_decoder(\(name)) failed")
        }
        codecName = String(cString: codec.pointee.name)
        guard let ctx = avcodec_alloc_context3(codec) else {
            throw DecodeFailure(.outOfMemory, "\(path): out of memory allocating a decoder", path: path)
        }
        context = ctx
        let mark = FFLog.mark()
        var rc = avcodec_parameters_to_context(ctx, par)
        if rc < 0 { throw FFError.failure(rc, "cannot configure the \(codecName) decoder", path: path, logMark: mark) }
        ctx.pointee.pkt_timebase = st.pointee.time_base
        ctx.pointee.thread_count = Int32(clamping: threads)
        ctx.pointee.max_pixels = Int64(maxPixels)
        rc = avcodec_open2(ctx, codec, nil)
        if rc < 0 { throw FFError.failure(rc, "cannot open the \(codecName) decoder", path: path, logMark: mark) }
    }

    deinit {
        var ctx: UnsafeMutablePointer<AVCodecContext>? = context
        avcodec_free_context(&ctx)
    }

    /// `avcodec_send_packet`; nil sends the end-of-stream flush.
    func send(_ packet: Packet?) -> Int32 {
        avcodec_send_packet(context, packet?.pointer)
    }

    /// `avcodec_receive_frame`: 0, EAGAIN, EOF or an error.
    func receive(into frame: Frame) -> Int32 {
        avcodec_receive_frame(context, frame.pointer)
    }

    /// `avcodec_flush_buffers`: forget references and queued frames (after a seek).
    func flush() { avcodec_flush_buffers(context) }
}
