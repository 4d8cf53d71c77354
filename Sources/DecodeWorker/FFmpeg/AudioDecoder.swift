import CFFmpeg
import Shared

/// An opened audio decoder (`AVCodecContext`) for one stream.
///
/// Encoder delay and padding are left to FFmpeg: without `AV_CODEC_FLAG2_SKIP_MANUAL` the decoder
/// drops the samples that `AV_PKT_DATA_SKIP_SAMPLES` side data names (MP3 LAME/Xing priming and
/// padding, Opus pre-skip and end trimming, MP4 edit-list priming) and moves the frame's pts
/// past them, so decoded frames start at the first real sample.
final class AudioDecoder {
    let context: UnsafeMutablePointer<AVCodecContext>
    let codecName: String

    /// Opens the stream's decoder (`avcodec_find_decoder`, `avcodec_open2`) with `threads`
    /// threads. A codec this FFmpeg cannot decode is `unsupported` (xHE-AAC in 5.1 fails to open
    /// with ENOSYS, which maps to `unsupported` too).
    init(stream st: UnsafeMutablePointer<AVStream>, threads: Int, path: String) throws(DecodeFailure) {
        let par = st.pointee.codecpar!
        let codecID = par.pointee.codec_id
        guard let codec = avcodec_find_decoder(codecID) else {
            let name = StreamInfo.name(of: codecID)
            throw DecodeFailure(
                .unsupported, "\(path): no decoder for the audio codec '\(name)' in this FFmpeg build",
                path: path, detail: "avcodec_find_decoder(\(name)) failed")
        }
        codecName = String(cString: codec.pointee.name)
        guard let ctx = avcodec_alloc_context3(codec) else {
            throw DecodeFailure(.outOfMemory, "\(path): out of memory allocating an audio decoder", path: path)
        }
        context = ctx
        let mark = FFLog.mark()
        var rc = avcodec_parameters_to_context(ctx, par)
        if rc < 0 {
            throw FFError.failure(rc, "cannot configure the \(codecName) audio decoder", path: path, logMark: mark)
        }
        ctx.pointee.pkt_timebase = st.pointee.time_base
        ctx.pointee.thread_count = Int32(clamping: threads)
        rc = avcodec_open2(ctx, codec, nil)
        if rc < 0 {
            throw FFError.failure(rc, "cannot open the \(codecName) audio decoder", path: path, logMark: mark)
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
}

extension Frame {
    /// Samples per channel in a decoded audio frame.
    var sampleCount: Int { Int(pointer.pointee.nb_samples) }
    var sampleRate: Int { Int(pointer.pointee.sample_rate) }
    var channelCount: Int { Int(pointer.pointee.ch_layout.nb_channels) }
    var sampleFormat: Int32 { pointer.pointee.format }

    /// A new reference to the same frame data (`av_frame_ref`), to hold a frame back.
    func reference() throws(DecodeFailure) -> Frame {
        let copy = try Frame()
        let rc = av_frame_ref(copy.pointer, pointer)
        if rc < 0 { throw FFError.failure(rc, "referencing an audio frame", path: "") }
        return copy
    }
}
