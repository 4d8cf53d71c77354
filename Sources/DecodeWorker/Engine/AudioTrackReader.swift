import CFFmpeg
import Shared

/// Decodes one audio stream onto the clip's sample grid (docs/decoding.md, "Audio").
///
/// Packets → `Decoder` → frames → `Resampler` → `AudioSink`. Every frame's pts is compared
/// with where the samples fed so far end: within `tolerance` the frame is contiguous (container
/// timestamps are rounded, e.g. to 1 ms in Matroska); beyond it, and when the next frame confirms
/// the offset (Vorbis frames' pts wobble by half a block and come back), the difference is a gap,
/// filled by feeding silence through the resampler, or an overlap, dropped from the input. So the
/// resampler runs continuously and its output stays on one phase, and every sample stays within
/// `tolerance` of where its timestamp puts it. A jump beyond `maxGap`/`maxOverlap` is a timestamp
/// error, not audio: the stream is concatenated there with a warning. A change of sample rate,
/// format or layout mid-stream starts a new resampler, placed by its first frame's timestamp.
final class AudioTrackReader {
    /// Where the time origin lies.
    enum Origin {
        /// Seconds on the container clock (the first video frame's pts).
        case containerSeconds(Double)
        /// The first decoded sample (files without video).
        case firstSample
    }

    /// What to produce: `[start, end)` in seconds from the origin; `start` nil for "from the
    /// origin, or from the first sample if that is earlier", `end` nil for "to the end of the
    /// stream"; with `padToEnd`, silence fills the range up to `end` when the audio stops early.
    struct Plan {
        var origin: Origin
        var start: Double?
        var end: Double?
        var padToEnd: Bool
        var rate: Int
        var channels: Int
        var threads: Int
        var byteBudget: Int
        /// Whether packets far before `start` may go undecoded (see `skipUntil`).
        var allowSkip = true
        /// Samples per channel the stream claims to hold in the range, when it says: the sink
        /// reserves them at once instead of growing (and faulting in) its planes a dozen times.
        var expectedSamples: Int?
    }

    struct Outcome {
        var sink: AudioSink
        /// The origin on the container clock, seconds.
        var originSeconds: Double
        /// First decoded sample and end of the decoded audio, seconds from the origin.
        var streamStart: Double?
        var streamEnd: Double?
        /// Samples decoded, at the stream's rate (encoder delay and padding already trimmed).
        var decodedSamples = 0
        var inputRate: Int?
        var inputLayout: String?
        var gaps = 0
        var gapSeconds = 0.0
        var overlaps = 0
        var overlapSeconds = 0.0
        var jumps = 0
        var formatChanges = 0
        /// Samples past the container's stated end that were cut (MP4 encoder padding).
        var trimmedSamples = 0
        /// Samples of silence appended after the stream's end (`padToEnd`).
        var trailingPadSamples = 0
        /// FFmpeg error lines logged while decoding.
        var errors: [String] = []
        /// The demuxer stopped with an error (damaged or truncated file).
        var readError: String?
        /// The stream was decoded to its end (not stopped at the range's end).
        var reachedEnd = false
        /// Packets before the range that were read but not decoded.
        var skippedPackets = 0
    }

    /// Frames whose pts is off by more than this from where the samples end are a gap or an overlap.
    static let minimumTolerance = 0.002
    /// Larger timestamp jumps are errors: the stream is concatenated there.
    static let maxGap = 60.0
    static let maxOverlap = 10.0
    /// Silence is fed through the resampler in pieces of at most this many samples.
    static let silenceChunk = 16384
    /// Decoding resumes this long before `start` after skipped packets, so that the decoder's
    /// state (MDCT overlap, MP3 bit reservoir, SBR, Opus pre-roll) has converged by `start`.
    static let skipPreroll = 1.0
    /// Packets are skipped only when that saves at least this much audio.
    static let minimumSkip = 5.0

    private let demuxer: Demuxer
    private let streamIndex: Int
    private let plan: Plan
    private let path: String
    private let timeBase: Double
    private let tolerance: Double
    private let decoder: Decoder
    private let packet: Packet
    private let frame: Frame

    private var originSeconds: Double?
    private var sink: AudioSink?
    private var outcome: Outcome?
    private var resampler: Resampler?
    /// Time (seconds from the origin) of the first input sample fed to the current resampler,
    /// and input samples fed to it since (silence included, dropped samples not).
    private var anchor = 0.0
    private var fed = 0
    private var pendingDrop = 0
    private var held: (frame: Frame, deviation: Double)?
    private var largestFrame = 0
    private var stats = Outcome.Stats()
    /// Packets that end before this time (seconds from the origin) are not decoded: set after the
    /// first frame when `start` lies far into a stream whose timestamps count whole samples.
    private var skipUntil: Double?
    private var skippedPackets = 0
    /// The first frame after skipped packets must be re-anchored on the stream's sample grid.
    private var needsRealign = false
    /// Time and rate of the stream's first decoded sample.
    private var firstSample: (time: Double, rate: Int)?
    /// Errors are counted from the first packet sent at or after this time (skip mode), so that
    /// a decoder complaining about the jump, inside the pre-roll, is not reported as damage.
    private var countErrorsFrom: Double?

    init(demuxer: Demuxer, streamIndex: Int, plan: Plan, path: String) throws(DecodeFailure) {
        self.demuxer = demuxer
        self.streamIndex = streamIndex
        self.plan = plan
        self.path = path
        let st = demuxer.stream(streamIndex)
        let tb = st.pointee.time_base
        timeBase = tb.den != 0 ? Double(tb.num) / Double(tb.den) : 0
        tolerance = max(Self.minimumTolerance, 2 * timeBase)
        decoder = try Decoder(stream: st, media: .audio, threads: plan.threads, path: path)
        packet = try Packet()
        frame = try Frame()
        if case .containerSeconds(let s) = plan.origin { originSeconds = s }
    }

    /// Decodes until the range is complete or the stream ends.
    func run() throws(DecodeFailure) -> Outcome {
        demuxer.discardAll(except: [streamIndex])
        var mark = FFLog.mark()
        var readError: String?
        var reachedEnd = false
        reading: while !(sink?.isFull ?? false) {
            switch demuxer.read(into: packet) {
            case .endOfFile:
                reachedEnd = true
                break reading
            case .error(let code):
                readError = FFError.text(code)
                reachedEnd = true
                break reading
            case .packet:
                guard packet.streamIndex == streamIndex, packet.size > 0 else { continue }
                if let until = skipUntil, let pts = packet.pts, let origin = originSeconds {
                    let t = Double(pts) * timeBase - origin
                    if t + Double(max(packet.duration, 0)) * timeBase < until {
                        skippedPackets += 1
                        continue
                    }
                    skipUntil = nil
                    needsRealign = skippedPackets > 0
                }
                if let from = countErrorsFrom, let pts = packet.pts, let origin = originSeconds,
                    Double(pts) * timeBase - origin >= from
                {
                    mark = FFLog.mark()
                    countErrorsFrom = nil
                }
                var rc = decoder.send(packet)
                while rc == CFFMPEG_AVERROR_EAGAIN {
                    try drain()
                    rc = decoder.send(packet)
                }
                if rc < 0 {
                    if rc == CFFMPEG_AVERROR_ENOMEM { throw FFError.failure(rc, "decoding audio", path: path) }
                    FFLogNote.record(rc)
                }
                try drain()
            }
        }
        if reachedEnd {
            _ = decoder.send(nil)
            try drain()
        }
        try releaseHeld()
        try flushResampler()
        guard var result = outcome, let sink else {
            // Not a single sample decoded.
            let origin = originSeconds ?? 0
            let empty = AudioSink(
                first: 0, last: 0, channels: plan.channels, rate: plan.rate, byteBudget: plan.byteBudget, path: path)
            var none = Outcome(sink: empty, originSeconds: origin)
            none.errors = FFLog.errors(since: mark)
            none.readError = readError
            none.reachedEnd = reachedEnd
            return none
        }
        if reachedEnd { trimToContainerEnd(&result, sink: sink) }
        if plan.padToEnd, let last = sink.last {
            let before = sink.end
            try sink.pad(to: last)
            result.trailingPadSamples = sink.end - before
        }
        sink.close()
        result.errors = FFLog.errors(since: mark)
        result.readError = readError
        result.reachedEnd = reachedEnd
        result.skippedPackets = skippedPackets
        stats.apply(to: &result)
        return result
    }

    // MARK: - Frames

    private func drain() throws(DecodeFailure) {
        while true {
            frame.unref()
            let rc = decoder.receive(into: frame)
            if rc == CFFMPEG_AVERROR_EAGAIN || rc == CFFMPEG_AVERROR_EOF { return }
            if rc < 0 {
                if rc == CFFMPEG_AVERROR_ENOMEM { throw FFError.failure(rc, "decoding audio", path: path) }
                FFLogNote.record(rc)
                return
            }
            try take(frame)
        }
    }

    /// Seconds from the origin of a frame's first sample, when it has a timestamp.
    private func time(of frame: Frame) -> Double? {
        guard let pts = frame.anyPts, let origin = originSeconds else { return nil }
        return Double(pts) * timeBase - origin
    }

    /// The sink, once the first frame says where the stream starts (`t0`, seconds from the origin).
    private func makeSink(firstSample t0: Double) {
        // With no start, the range begins at the origin or, when the stream begins earlier, at its
        // first sample (the grid index where `take` places it).
        let first = plan.start.map { Int(($0 * Double(plan.rate) - 1e-6).rounded(.up)) }
            ?? min(0, Int((t0 * Double(plan.rate)).rounded()))
        let last = plan.end.map { max(first, Int(($0 * Double(plan.rate) - 1e-6).rounded(.up))) }
        let sink = AudioSink(
            first: first, last: last, channels: plan.channels, rate: plan.rate, byteBudget: plan.byteBudget, path: path,
            expectedSamples: plan.expectedSamples)
        self.sink = sink
    }

    private func take(_ frame: Frame) throws(DecodeFailure) {
        let count = frame.sampleCount
        guard count > 0, frame.sampleRate > 0 else { return }
        if originSeconds == nil { originSeconds = frame.anyPts.map { Double($0) * timeBase } ?? 0 }
        if sink == nil { makeSink(firstSample: time(of: frame) ?? 0) }
        guard let sink else { return }
        if sink.isFull { return }
        let t = time(of: frame)
        if outcome == nil {
            outcome = Outcome(sink: sink, originSeconds: originSeconds!)
            outcome!.streamStart = t ?? 0
        }
        outcome!.decodedSamples += count
        largestFrame = max(largestFrame, count)
        if firstSample == nil {
            firstSample = (t ?? 0, frame.sampleRate)
            planSkip(firstFrameRate: frame.sampleRate)
        }
        if needsRealign {
            try realign(frame, at: t)
            return
        }

        if resampler?.key != Resampler.InputKey(frame) {
            try releaseHeld()
            let continuing = resampler.map { anchor + Double(fed) / Double($0.inputRate) }
            if resampler != nil {
                try flushResampler()
                outcome!.formatChanges += 1
            }
            let next = try Resampler(for: frame, outputRate: plan.rate, outputChannels: plan.channels, path: path)
            resampler = next
            outcome!.inputRate = next.inputRate
            outcome!.inputLayout = next.inputLayoutName
            anchor = t ?? continuing ?? 0
            fed = 0
            pendingDrop = 0
            sink.begin(at: Int((anchor * Double(plan.rate)).rounded()))
            try feed(frame, at: anchor)
            return
        }
        let rate = Double(resampler!.inputRate)
        if let pending = held {
            held = nil
            let heldFrame = pending.frame, deviation = pending.deviation
            let expectedAfter = anchor + Double(fed + heldFrame.sampleCount) / rate
            if let t, abs((t - expectedAfter) - deviation) <= tolerance {
                // The offset persists: a real gap or overlap before the held frame.
                try applyDiscontinuity(deviation)
            }
            try feed(heldFrame, at: nil)
        }
        let expected = anchor + Double(fed) / rate
        guard let t, abs(t - expected) > tolerance else {
            try feed(frame, at: t)
            return
        }
        held = (try frame.reference(path: path), t - expected)
    }

    /// Decides, at the first frame, whether packets before `start` can go undecoded: only with an
    /// explicit `start` well into the stream, and a time base that counts whole samples (MP4, Ogg,
    /// WAV, FLAC, MP3), so that resuming lands exactly on the sample grid of a full decode.
    private func planSkip(firstFrameRate rate: Int) {
        guard plan.allowSkip, let start = plan.start, let first = firstSample else { return }
        let tb = demuxer.stream(streamIndex).pointee.time_base
        guard tb.num == 1, tb.den > 0, rate > 0, Int(tb.den) % rate == 0 else { return }
        let preroll = max(
            Self.skipPreroll,
            Double(demuxer.stream(streamIndex).pointee.codecpar.pointee.seek_preroll) / Double(rate))
        let until = start - preroll
        guard until - first.time >= Self.minimumSkip else { return }
        skipUntil = until
        countErrorsFrom = start - preroll / 4
    }

    /// The first frame after skipped packets: a new resampler whose first input sample is one that
    /// a full decode would also map to a whole output sample (a multiple of inRate/gcd(inRate, R)
    /// samples after the stream's first), placed where the full decode places it. After the
    /// pre-roll the output is then the same as a full decode's.
    private func realign(_ frame: Frame, at t: Double?) throws(DecodeFailure) {
        guard let first = firstSample, let sink, let t else {
            needsRealign = false
            return
        }
        let rate = frame.sampleRate
        var a = rate, b = plan.rate
        while b != 0 { (a, b) = (b, a % b) }
        let step = rate / a
        let index = Int(((t - first.time) * Double(rate)).rounded())
        let drop = (step - index % step) % step
        guard drop < frame.sampleCount else { return }  // the next frame will do
        needsRealign = false
        held = nil
        let next = try Resampler(for: frame, outputRate: plan.rate, outputChannels: plan.channels, path: path)
        resampler = next
        outcome!.inputRate = next.inputRate
        outcome!.inputLayout = next.inputLayoutName
        // The first input sample fed is `index + drop` samples after the stream's first, a
        // multiple of `step`, so it maps to a whole output sample: `(index + drop) × R / rate`.
        anchor = first.time + Double(index + drop) / Double(rate)
        fed = 0
        pendingDrop = drop
        sink.begin(at: Int((first.time * Double(plan.rate)).rounded()) + (index + drop) / step * (plan.rate / a))
        try feed(frame, at: t)
    }

    /// Feeds a held frame whose offset was never confirmed, as contiguous.
    private func releaseHeld() throws(DecodeFailure) {
        guard let pending = held else { return }
        held = nil
        try feed(pending.frame, at: nil)
    }

    private func applyDiscontinuity(_ deviation: Double) throws(DecodeFailure) {
        guard let resampler, let sink else { return }
        let rate = Double(resampler.inputRate)
        if deviation > Self.maxGap || deviation < -Self.maxOverlap {
            // A timestamp error (reset, wrap, garbage): follow the new timestamps from here on,
            // keeping the samples contiguous.
            anchor += deviation
            stats.jumps += 1
            return
        }
        if deviation > 0 {
            var remaining = Int((deviation * rate).rounded())
            stats.gaps += 1
            stats.gapSeconds += Double(remaining) / rate
            while remaining > 0 && !sink.isFull {
                let n = min(remaining, Self.silenceChunk)
                let produced = try resampler.convertSilence(count: n, path: path)
                try sink.append({ resampler.output(channel: $0, count: produced) }, count: produced)
                fed += n
                remaining -= n
            }
            fed += remaining
        } else {
            let n = Int((-deviation * rate).rounded())
            stats.overlaps += 1
            stats.overlapSeconds += Double(n) / rate
            pendingDrop += n
        }
    }

    /// Resamples `frame` (less any pending overlap) onto the sink.
    private func feed(_ frame: Frame, at t: Double?) throws(DecodeFailure) {
        guard let resampler, let sink else { return }
        let count = frame.sampleCount
        let rate = Double(resampler.inputRate)
        let start = t ?? anchor + Double(fed) / rate
        outcome!.streamEnd = max(outcome!.streamEnd ?? -.infinity, start + Double(count) / rate)
        let skip = min(pendingDrop, count)
        pendingDrop -= skip
        guard skip < count, !sink.isFull else { return }
        let produced = try resampler.convert(frame, from: skip, count: count - skip, path: path)
        fed += count - skip
        try sink.append({ resampler.output(channel: $0, count: produced) }, count: produced)
    }

    private func flushResampler() throws(DecodeFailure) {
        guard let resampler, let sink, !sink.isFull else { return }
        let produced = try resampler.flush(path: path)
        try sink.append({ resampler.output(channel: $0, count: produced) }, count: produced)
    }

    /// MP4/MOV: the edit list gives the stream's real length, and the samples past it are the
    /// encoder's padding (AAC pads its last frame), which FFmpeg 5.1 leaves in. Cut them when
    /// they are less than one frame, i.e. when the stated end is plausible as encoder padding.
    private func trimToContainerEnd(_ result: inout Outcome, sink: AudioSink) {
        guard let format = demuxer.formatName, format.hasPrefix("mov,"), let end = result.streamEnd,
            let origin = originSeconds
        else { return }
        let st = demuxer.stream(streamIndex)
        guard st.pointee.duration > 0, st.pointee.duration != CFFMPEG_NOPTS_VALUE else { return }
        let startTicks = st.pointee.start_time == CFFMPEG_NOPTS_VALUE ? 0 : st.pointee.start_time
        let statedEnd = Double(startTicks + st.pointee.duration) * timeBase - origin
        let rate = Double(result.inputRate ?? 1)
        let excess = end - statedEnd
        guard excess > 0.5 / rate, excess <= Double(largestFrame) / rate + 1e-6 else { return }
        let index = Int((statedEnd * Double(plan.rate) - 1e-6).rounded(.up))
        let before = sink.end
        sink.truncate(to: index)
        result.trimmedSamples = before - sink.end
        result.streamEnd = statedEnd
    }
}

extension AudioTrackReader.Outcome {
    init(sink: AudioSink, originSeconds: Double) {
        self.sink = sink
        self.originSeconds = originSeconds
    }

    /// Discontinuity counters, kept apart while `Outcome` is built lazily.
    struct Stats {
        var gaps = 0
        var gapSeconds = 0.0
        var overlaps = 0
        var overlapSeconds = 0.0
        var jumps = 0

        func apply(to outcome: inout AudioTrackReader.Outcome) {
            outcome.gaps = gaps
            outcome.gapSeconds = gapSeconds
            outcome.overlaps = overlaps
            outcome.overlapSeconds = overlapSeconds
            outcome.jumps = jumps
        }
    }
}
