import CFFmpeg
import Shared

/// An opened decoder (`AVCodecContext`) for one stream, video or audio.
///
/// Audio: encoder delay and padding are left to FFmpeg. Without `AV_CODEC_FLAG2_SKIP_MANUAL` the
/// decoder drops the samples that `AV_PKT_DATA_SKIP_SAMPLES` side data names (MP3 LAME/Xing
/// priming and padding, Opus pre-skip and end trimming, MP4 edit-list priming) and moves the
/// frame's pts past them, so decoded frames start at the first real sample.
final class Decoder {
    enum Media {
        /// With FFmpeg's own `max_pixels` limit, so that a frame size change mid-stream cannot
        /// exceed it either.
        case video(maxPixels: Int)
        case audio

        var noun: String {
            switch self {
            case .video: "video"
            case .audio: "audio"
            }
        }
    }

    let context: UnsafeMutablePointer<AVCodecContext>
    let codecName: String

    /// Opens the stream's decoder (`avcodec_find_decoder`, `avcodec_open2`) with `threads`
    /// threads (0: FFmpeg's choice). A codec this FFmpeg cannot decode is `unsupported` (xHE-AAC
    /// in 5.1 fails to open with ENOSYS, which maps to `unsupported` too).
    init(stream st: UnsafeMutablePointer<AVStream>, media: Media, threads: Int, path: String) throws(DecodeFailure) {
        let par = st.pointee.codecpar!
        let codecID = par.pointee.codec_id
        guard let codec = avcodec_find_decoder(codecID) else {
            let name = avcodec_get_name(codecID).map { String(cString: $0) } ?? "unknown"
            throw DecodeFailure(
                .unsupported, "\(path): no decoder for the \(media.noun) codec '\(name)' in this FFmpeg build",
                path: path, detail: "avcodec_find_decoder(\(name)) failed")
        }
        codecName = String(cString: codec.pointee.name)
        guard let ctx = avcodec_alloc_context3(codec) else {
            throw DecodeFailure(.outOfMemory, "\(path): out of memory allocating a \(media.noun) decoder", path: path)
        }
        context = ctx
        let mark = FFLog.mark()
        var rc = avcodec_parameters_to_context(ctx, par)
        if rc < 0 {
            throw FFError.failure(rc, "cannot configure the \(codecName) \(media.noun) decoder", path: path, logMark: mark)
        }
        ctx.pointee.pkt_timebase = st.pointee.time_base
        ctx.pointee.thread_count = Int32(clamping: threads)
        if case .video(let maxPixels) = media { ctx.pointee.max_pixels = Int64(maxPixels) }
        rc = avcodec_open2(ctx, codec, nil)
        if rc < 0 {
            throw FFError.failure(rc, "cannot open the \(codecName) \(media.noun) decoder", path: path, logMark: mark)
        }
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

    /// `skip_frame = AVDISCARD_NONREF` (or back to the default) for the packets sent from now
    /// on: frames that no other frame references are not decoded at all.
    func skipNonReferenceFrames(_ skip: Bool) {
        context.pointee.skip_frame = skip ? AVDISCARD_NONREF : AVDISCARD_DEFAULT
    }

    /// `avcodec_flush_buffers`: forget references and queued frames (after a seek).
    func flush() { avcodec_flush_buffers(context) }
}
