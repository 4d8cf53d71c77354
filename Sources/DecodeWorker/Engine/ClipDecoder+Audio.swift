import CFFmpeg
import Shared

/// The audio half of a decode (docs/decoding.md, "Audio"): choose the stream, estimate the
/// output, decode it onto the clip's sample grid, report, and write the chunks.
extension ClipDecoder {
    /// The best audio stream (`av_find_best_stream`), checked for a decoder and encryption.
    static func chooseAudioStream(_ demuxer: Demuxer, path: String, withVideo: Bool) throws(DecodeFailure) -> Int {
        guard let index = demuxer.bestStream(AVMEDIA_TYPE_AUDIO) else {
            throw DecodeFailure(
                .unsupported, "\(path): no audio stream (only \(describeStreams(demuxer)))", path: path,
                detail: withVideo
                    ? "audio was requested from a file without an audio stream; audio_optional returns the video alone"
                    : "audio alone was requested from a file without an audio stream")
        }
        let st = demuxer.stream(index)
        let codec = st.pointee.codecpar.pointee.codec_id
        if cffmpeg_stream_is_encrypted(st) != 0 {
            throw DecodeFailure(
                .unsupported, "\(path): the audio stream is encrypted (CENC/CBCS); it cannot be decoded without its key",
                path: path, detail: "encryption side data on the audio stream")
        }
        if avcodec_find_decoder(codec) == nil {
            throw DecodeFailure(
                .unsupported, "\(path): no decoder for the audio codec '\(StreamInfo.name(of: codec))' in this FFmpeg build",
                path: path, detail: FFLog.summary() ?? "avcodec_find_decoder failed")
        }
        return index
    }

    /// Bytes the audio tensor will take, before decoding: exact for a bounded range, else from
    /// the container's duration. nil when unknown, or when the container's claim is implausible
    /// for the file's size (below 500 bit/s: a header that lies, which decoding will measure).
    static func estimatedAudioBytes(_ demuxer: Demuxer, _ index: Int, _ plan: AudioTrackReader.Plan) -> Int? {
        let rate = Double(plan.rate)
        let first = ((plan.start ?? 0) * rate - 1e-6).rounded(.up)
        var end = plan.end
        if end == nil || end == .infinity {
            let st = demuxer.stream(index)
            let tb = av_q2d(st.pointee.time_base)
            let startTicks = st.pointee.start_time == CFFMPEG_NOPTS_VALUE ? 0 : st.pointee.start_time
            var claimed: Double?
            var containerEnd: Double?
            if st.pointee.duration > 0, st.pointee.duration != CFFMPEG_NOPTS_VALUE {
                claimed = Double(st.pointee.duration) * tb
                containerEnd = Double(startTicks + st.pointee.duration) * tb
            } else if let d = demuxer.duration {
                let formatStart = demuxer.context.pointee.start_time
                claimed = d
                containerEnd = d + (formatStart == CFFMPEG_NOPTS_VALUE ? 0 : Double(formatStart) / Double(AV_TIME_BASE))
            }
            guard let claimed, var containerEnd else { return nil }
            if let size = demuxer.fileSize, claimed * 62.5 > Double(size) { return nil }
            switch plan.origin {
            case .containerSeconds(let origin): containerEnd -= origin
            case .firstSample: containerEnd -= Double(startTicks) * tb
            }
            end = min(plan.end ?? .infinity, containerEnd)
        }
        guard let end, end.isFinite else { return nil }
        let samples = max(0, (end * rate - 1e-6).rounded(.up) - first)
        let bytes = samples * Double(plan.channels) * 4
        return bytes >= Double(Int.max / 2) ? Int.max / 2 : Int(bytes)
    }

    struct DecodedAudio {
        var sink: AudioSink
        var result: AudioResult
        var partialReasons: [String] = []
        var warnings: [String] = []
    }

    /// Decodes the audio stream per `plan` and describes the outcome.
    static func decodeAudio(
        _ demuxer: Demuxer, streamIndex: Int, plan: AudioTrackReader.Plan, firstFramePts: Double?, path: String
    ) throws(DecodeFailure) -> DecodedAudio {
        let reader = try AudioTrackReader(demuxer: demuxer, streamIndex: streamIndex, plan: plan, path: path)
        let outcome = try reader.run()
        let codec = StreamInfo.name(of: demuxer.stream(streamIndex).pointee.codecpar.pointee.codec_id)
        guard outcome.decodedSamples > 0 else {
            var detail = outcome.errors.isEmpty ? "the \(codec) stream holds no audio samples" : "no audio frame decoded"
            if let e = outcome.readError { detail += "; the demuxer stopped: \(e)" }
            if !outcome.errors.isEmpty { detail += " | " + outcome.errors.prefix(8).joined(separator: " | ") }
            throw DecodeFailure(.decodeError, "\(path): the audio stream (\(codec)) could not be decoded", path: path, detail: detail)
        }
        let sink = outcome.sink
        let rate = Double(plan.rate)
        let start = Double(sink.first) / rate
        func seconds(_ s: Double) -> String { JSONValue.number((s * 1000).rounded() / 1000).jsonString }
        if sink.count == 0 {
            // Samples decoded, none inside the range: it lies past the end of the audio. That is
            // the request's mistake, as for video, not an empty tensor presented as success.
            let field = plan.start != nil ? "start" : "end"
            let length = containerAudioDuration(demuxer, streamIndex).map { " (the container says \(seconds($0)) s)" } ?? ""
            throw DecodeFailure(
                .invalidRequest, "\(path): the requested range holds no audio: it lies past the end of the \(codec) stream\(length)",
                path: path, detail: field)
        }

        let total = sink.count * sink.channels
        let garbage = sink.sanitize()
        if total > 0, garbage * 100 >= total {
            throw DecodeFailure(
                .decodeError, "\(path): the audio stream (\(codec)) decodes to garbage", path: path,
                detail: "\(garbage) of \(total) output samples are NaN, infinite or beyond ±\(Int(AudioSink.sampleLimit))")
        }
        var partialReasons: [String] = []
        if garbage > 0 {
            partialReasons.append(
                "audio: \(garbage) of \(total) output samples were NaN, infinite or beyond ±\(Int(AudioSink.sampleLimit)) (decoder garbage) and were set to 0")
        }
        if let e = outcome.readError {
            partialReasons.append("audio: the demuxer stopped early (\(e)); the audio ends at \(seconds(outcome.streamEnd ?? start)) s")
        }
        if !outcome.errors.isEmpty {
            partialReasons.append("audio: FFmpeg reported: " + outcome.errors.prefix(8).joined(separator: " | "))
        }

        var warnings: [String] = []
        let leading = Double(max(0, (sink.firstAudioIndex ?? sink.end) - sink.first)) / rate
        if leading >= 0.1 {
            warnings.append(
                "the audio starts at \(seconds(outcome.streamStart ?? start)) s: \(seconds(leading)) s of silence before its first sample")
        }
        if outcome.gaps > 0 {
            warnings.append(
                "\(outcome.gaps) timestamp gap(s) in the audio stream filled with \(seconds(outcome.gapSeconds)) s of silence")
        }
        if outcome.overlaps > 0 {
            warnings.append(
                "\(outcome.overlaps) timestamp overlap(s) in the audio stream: \(seconds(outcome.overlapSeconds)) s of audio dropped")
        }
        if outcome.jumps > 0 {
            warnings.append(
                "\(outcome.jumps) audio timestamp jump(s) beyond \(Int(AudioTrackReader.maxGap)) s forward or \(Int(AudioTrackReader.maxOverlap)) s back: taken as timestamp errors, the audio continues without a gap there")
        }
        if outcome.formatChanges > 0 {
            warnings.append("the audio format changed \(outcome.formatChanges) time(s) mid-stream; each part is placed by its timestamps")
        }
        let trailing = Double(outcome.trailingPadSamples) / rate
        if trailing >= 0.1 {
            warnings.append(
                "the audio ends at \(seconds(outcome.streamEnd ?? start)) s, before the end of the video range: \(seconds(trailing)) s of silence after it")
        }
        // With packets skipped (not decoded) before the range, the decoded span says nothing
        // about the stream's length.
        if outcome.reachedEnd, outcome.readError == nil, outcome.skippedPackets == 0,
            let claimed = containerAudioDuration(demuxer, streamIndex),
            let s0 = outcome.streamStart, let s1 = outcome.streamEnd
        {
            let decoded = s1 - s0
            if abs(claimed - decoded) > max(1.0, 0.1 * claimed) {
                warnings.append(
                    "the container says the audio lasts \(seconds(claimed)) s, but \(seconds(decoded)) s decode: the length is measured by decoding")
            }
        }

        var result = AudioResult(
            shape: [plan.channels, sink.count], sampleRate: plan.rate, channels: plan.channels, start: start,
            offsetFromFirstFrame: firstFramePts.map { start - $0 })
        result.streamStart = outcome.streamStart
        result.streamEnd = outcome.streamEnd
        result.paddedSeconds = Double(sink.paddedSamples) / rate + outcome.gapSeconds
        result.droppedSeconds = outcome.overlapSeconds + Double(sink.droppedSamples) / rate
        return DecodedAudio(sink: sink, result: result, partialReasons: partialReasons, warnings: warnings)
    }

    /// The stream's duration as the container states it (seconds), else the file's.
    static func containerAudioDuration(_ demuxer: Demuxer, _ index: Int) -> Double? {
        let st = demuxer.stream(index)
        if st.pointee.duration > 0, st.pointee.duration != CFFMPEG_NOPTS_VALUE {
            return Double(st.pointee.duration) * av_q2d(st.pointee.time_base)
        }
        return demuxer.duration
    }

    /// Writes the audio tensor: channel-major, one zstd frame per channel per chunk of
    /// `BlockFormat.audioChunkSeconds` (the last of each channel shorter).
    static func writeAudio(_ sink: AudioSink, tensor: Int, writer: BlockWriter, path: String) throws(DecodeFailure) {
        let chunk = sink.rate * BlockFormat.audioChunkSeconds
        for plane in sink.planes {
            let written = plane.withUnsafeBytes { raw in
                Result { () throws(BlockError) in
                    var offset = 0
                    while offset < plane.count {
                        let n = min(chunk, plane.count - offset)
                        try writer.append(tensor: tensor, UnsafeRawBufferPointer(rebasing: raw[(offset * 4)..<((offset + n) * 4)]))
                        offset += n
                    }
                }
            }
            if case .failure(let error) = written {
                throw DecodeFailure(.decodeError, "\(path): cannot write the block: \(error.message)", path: path, detail: error.message)
            }
        }
    }
}

extension Comparable {
    func clamped(to range: ClosedRange<Self>) -> Self { min(max(self, range.lowerBound), range.upperBound) }
}
