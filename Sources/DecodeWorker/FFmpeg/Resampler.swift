import CFFmpeg
import Shared

/// Converts decoded audio to float32 planar at the output rate and channel count (libswresample).
///
/// One `SwrContext` with FFmpeg's defaults, exactly what the ffmpeg CLI's `-ar R -ac C` sets up:
/// the same polyphase filter, and the standard downmix matrix (centre and surround at −3 dB,
/// LFE dropped) from the input layout to the default layout for C channels. An input whose
/// layout is unspecified gets the default layout for its channel count, as the CLI guesses it.
/// The resampler is zero-phase: output sample k is at the time of input sample 0 plus k/R, so
/// placing its first output sample places all of them. Its filter holds some input back
/// (`swr_get_delay`); `flush` returns that tail at the end of the stream.
final class Resampler {
    /// What a resampler was configured for; a frame with another key needs a new resampler.
    struct InputKey: Equatable {
        var rate: Int
        var format: Int32
        var channels: Int
        var order: UInt32
        var mask: UInt64

        init(_ frame: Frame) {
            let f = frame.pointer.pointee
            rate = Int(f.sample_rate)
            format = f.format
            channels = Int(f.ch_layout.nb_channels)
            order = f.ch_layout.order.rawValue
            mask = f.ch_layout.order == AV_CHANNEL_ORDER_NATIVE ? f.ch_layout.u.mask : 0
        }
    }

    let key: InputKey
    let inputRate: Int
    let outputRate: Int
    let outputChannels: Int
    /// The input layout as FFmpeg names it ("5.1(side)", "stereo"), for results and messages.
    let inputLayoutName: String
    private let swr: OpaquePointer
    private var capacity = 0
    private var planes: [UnsafeMutablePointer<Float>] = []
    private var planePointers: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>

    /// `swr_alloc_set_opts2` + `swr_init` for the format of `frame`.
    init(for frame: Frame, outputRate: Int, outputChannels: Int, path: String) throws(DecodeFailure) {
        key = InputKey(frame)
        inputRate = frame.sampleRate
        self.outputRate = outputRate
        self.outputChannels = outputChannels
        let channels = frame.channelCount
        guard inputRate > 0, channels > 0, channels <= Int(CFFMPEG_MAX_AUDIO_CHANNELS) else {
            throw DecodeFailure(
                .unsupported,
                "\(path): cannot resample audio with \(channels) channels at \(inputRate) Hz",
                path: path, detail: "decoded frames have an unusable sample rate or channel count")
        }
        var inLayout = AVChannelLayout()
        var outLayout = AVChannelLayout()
        defer {
            av_channel_layout_uninit(&inLayout)
            av_channel_layout_uninit(&outLayout)
        }
        var rc = cffmpeg_frame_channel_layout(frame.pointer, &inLayout)
        if rc < 0 { throw FFError.failure(rc, "reading the audio channel layout", path: path) }
        inputLayoutName = withUnsafePointer(to: &inLayout) { StreamInfo.channelLayoutName($0) } ?? "\(channels) channels"
        av_channel_layout_default(&outLayout, Int32(outputChannels))
        var context: OpaquePointer? = nil
        rc = swr_alloc_set_opts2(
            &context, &outLayout, AV_SAMPLE_FMT_FLTP, Int32(outputRate), &inLayout,
            AVSampleFormat(rawValue: frame.sampleFormat), Int32(inputRate), 0, nil)
        guard rc >= 0, let context else {
            throw FFError.failure(rc < 0 ? rc : CFFMPEG_AVERROR_ENOMEM, "configuring the audio resampler", path: path)
        }
        rc = swr_init(context)
        if rc < 0 {
            var doomed: OpaquePointer? = context
            swr_free(&doomed)
            let name = av_get_sample_fmt_name(AVSampleFormat(rawValue: frame.sampleFormat)).map { String(cString: $0) } ?? "?"
            throw FFError.failure(
                rc, "cannot resample \(name) \(inputLayoutName) at \(inputRate) Hz to \(outputChannels) channels at \(outputRate) Hz",
                path: path, reason: .unsupported)
        }
        swr = context
        planePointers = .allocate(capacity: outputChannels)
        planePointers.initialize(repeating: nil, count: outputChannels)
    }

    deinit {
        var context: OpaquePointer? = swr
        swr_free(&context)
        for plane in planes { plane.deallocate() }
        planePointers.deallocate()
    }

    /// The converted samples of the last call, one buffer per output channel.
    func output(channel: Int, count: Int) -> UnsafeBufferPointer<Float> {
        UnsafeBufferPointer(start: planes[channel], count: count)
    }

    /// Converts `count` samples of `frame` from sample `first`; returns the output samples now in
    /// `output`.
    func convert(_ frame: Frame, from first: Int, count: Int, path: String) throws(DecodeFailure) -> Int {
        try reserve(inputSamples: count)
        let n = cffmpeg_swr_convert_frame(swr, planePointers, Int32(capacity), frame.pointer, Int32(first), Int32(count))
        if n < 0 { throw FFError.failure(n, "resampling audio", path: path) }
        return Int(n)
    }

    /// Feeds `count` samples of silence in the input format (a timestamp gap).
    func convertSilence(count: Int, path: String) throws(DecodeFailure) -> Int {
        try reserve(inputSamples: count)
        let n = cffmpeg_swr_convert_silence(
            swr, planePointers, Int32(capacity), Int32(count), key.format, Int32(key.channels))
        if n < 0 { throw FFError.failure(n, "resampling silence", path: path) }
        return Int(n)
    }

    /// The end-of-stream flush (`swr_convert` with no input): the samples the filter still holds.
    func flush(path: String) throws(DecodeFailure) -> Int {
        try reserve(inputSamples: 0)
        let n = cffmpeg_swr_flush(swr, planePointers, Int32(capacity))
        if n < 0 { throw FFError.failure(n, "flushing the audio resampler", path: path) }
        return Int(n)
    }

    /// Grows the output planes to hold what `inputSamples` more input can produce
    /// (`swr_get_out_samples` counts the input the filter already holds).
    private func reserve(inputSamples: Int) throws(DecodeFailure) {
        let needed = Int(swr_get_out_samples(swr, Int32(clamping: inputSamples))) + 64
        guard needed > capacity else { return }
        let size = max(needed, 4096)
        for plane in planes { plane.deallocate() }
        planes = (0..<outputChannels).map { _ in UnsafeMutablePointer<Float>.allocate(capacity: size) }
        for (i, plane) in planes.enumerated() {
            planePointers[i] = UnsafeMutableRawPointer(plane).assumingMemoryBound(to: UInt8.self)
        }
        capacity = size
    }
}
