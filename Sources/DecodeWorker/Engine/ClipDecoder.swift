import CFFmpeg
import Shared
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A file descriptor closed exactly once, when the value goes away (unless released).
final class OwnedFD {
    private(set) var fd: FileDescriptor?

    init(_ fd: FileDescriptor) { self.fd = fd }

    /// Hands the fd to the caller, who closes it.
    func release() -> FileDescriptor? {
        defer { fd = nil }
        return fd
    }

    deinit { try? fd?.close() }
}

/// One clip to decode.
struct ClipRequest {
    /// What FFmpeg opens (a path, or /proc/self/fd/N for a passed fd).
    var path: String
    /// The clip's name in messages and results.
    var displayPath: String
    var options: DecodeOptions
    var access: AccessPolicy = .auto
    /// Decoder threads allowed for a dense selection beyond `options.threads` (WorkerJob.threadBudget).
    var threadBudget = 1
    /// A block slab to write the block into while it fits `limit` bytes (WorkerJob.slabLimit).
    var slab: (fd: FileDescriptor, limit: Int)? = nil
}

/// A decoded clip: the result metadata and its block, in a sealed memfd or in the request's slab.
struct DecodedClip {
    var result: DecodeResult
    /// The sealed memfd; nil when the block is in the request's slab.
    var block: OwnedFD?
    var blockBytes: Int
}

/// Which frames a request selects, before decoding.
struct FrameSelectionPlan: Equatable {
    /// Presentation indices in output order (timestamps may repeat a frame or be unsorted).
    var outputs: [Int]
    var sampleFps: Double
    var framesInRange: Int
}

/// The decode engine behind `decode` and `serve`: open, build the frame table, select, size,
/// decode, write the block. Audio (`AudioTrackReader`) comes after the video, on the same time
/// origin (the first video frame, `FrameTable.originTicks`), as a second tensor.
enum ClipDecoder {
    static func monotonicSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    static func decode(_ request: ClipRequest) throws(DecodeFailure) -> DecodedClip {
        FFLog.install()
        FFLog.reset()
        let started = monotonicSeconds()
        let options = request.options
        let path = request.displayPath
        try options.validate()
        let demuxer = try Demuxer(path: request.path, displayPath: path, maxPixels: options.maxSourcePixels)
        let videoIndex = demuxer.bestStream(AVMEDIA_TYPE_VIDEO)
        var warnings: [String] = []

        // The audio stream is chosen before anything is decoded, so a missing one fails at once.
        var audioIndex: Int? = nil
        if options.audio {
            do {
                audioIndex = try chooseAudioStream(demuxer, path: path, withVideo: options.video)
            } catch where options.audioOptional && options.video {
                warnings.append("no audio tensor (audio_optional): \(error.message)")
            }
        }

        var video: PreparedVideo? = nil
        if options.video {
            guard let videoIndex else {
                throw DecodeFailure(
                    .unsupported, "\(path): no video stream (only \(describeStreams(demuxer)))", path: path,
                    detail: options.audio
                        ? "the file has no video stream other than attached pictures; add no_video to decode its audio"
                        : "the file has no video stream other than attached pictures")
            }
            video = try prepareVideo(demuxer, videoIndex: videoIndex, options: options, path: path)
        }

        // The audio's time origin and range (docs/decoding.md, "Audio").
        var audioPlan: AudioTrackReader.Plan? = nil
        var audioBytesEstimate: Int? = nil
        if let audioIndex {
            var origin = AudioTrackReader.Origin.firstSample
            if let video {
                origin = .containerSeconds(video.originSeconds)
            } else if let videoIndex {
                // Audio only from a file with video: the origin is still the first video frame, so
                // that times agree with a request that also takes the video. A packet pass, no decoding.
                let table = try FrameTable.scan(demuxer, streamIndex: videoIndex, originOnly: true)
                if table.count > 0, table.hasTimes {
                    origin = .containerSeconds(Double(table.originTicks) * av_q2d(table.timeBase))
                } else {
                    warnings.append("the video stream has no timed frames: the audio's time origin is its own first sample")
                }
            }
            var end = options.end
            if let video { end = min(end ?? .infinity, video.table.endTime) }
            audioPlan = AudioTrackReader.Plan(
                origin: origin, start: options.start ?? (video != nil ? 0 : nil), end: end, padToEnd: video != nil,
                rate: options.sampleRate, channels: options.channels, threads: options.threads,
                byteBudget: options.maxOutputBytes - (video?.totalBytes ?? 0), allowSkip: request.access != .sequential)
            audioBytesEstimate = estimatedAudioBytes(demuxer, audioIndex, audioPlan!)
            audioPlan!.expectedSamples = audioBytesEstimate.map { $0 / (4 * max(1, options.channels)) }
            if let estimate = audioBytesEstimate, estimate > audioPlan!.byteBudget {
                let videoPart = video.map { " plus \($0.totalBytes) bytes of video" } ?? ""
                throw DecodeFailure(
                    .tooLarge,
                    "\(path): about \(estimate) bytes of audio (\(options.channels) channels at \(options.sampleRate) Hz, float32)\(videoPart) exceed the limit of \(options.maxOutputBytes)",
                    path: path, detail: "max_output_bytes=\(options.maxOutputBytes)")
            }
        }

        // The sealed memfd: made at once, or only when the block outgrows the request's slab.
        var block: OwnedFD?
        func makeMemfd() throws(BlockError) -> FileDescriptor {
            do {
                let memfd = try SharedMemory.createSealable()
                block = OwnedFD(memfd)
                return memfd
            } catch {
                throw BlockError("cannot create the block memfd: \(error)", outOfMemory: error == .noMemory)
            }
        }
        let writer: BlockWriter
        do {
            // One frame per channel per second of audio: from the range, else from the stream's
            // claimed duration with a margin (a header that outgrows its room still works, moved
            // once), else an hour. Every reserved byte is written, checksummed and read.
            let audioFrames = audioPlan.map { plan in
                var seconds = 3600.0
                if let end = plan.end, end.isFinite {
                    seconds = end - (plan.start ?? 0)
                } else if let bytes = audioBytesEstimate {
                    seconds = 1.25 * Double(bytes) / Double(4 * plan.channels * plan.rate) + 2
                }
                return plan.channels * Int(seconds.rounded(.up)).clamped(to: 1...100_000)
            } ?? 0
            let headerBytes = BlockWriter.estimatedHeaderBytes(frames: (video?.plan.outputs.count ?? 0) + audioFrames)
            let dataBytes = min(options.maxOutputBytes, (video?.totalBytes ?? 0) + (audioBytesEstimate ?? 0))
            if let slab = request.slab {
                writer = try BlockWriter(
                    slab: BlockWriter.Slab(fd: slab.fd, limit: slab.limit, overflow: makeMemfd), level: options.level,
                    reservedHeaderBytes: headerBytes, expectedDataBytes: dataBytes)
            } else {
                writer = try BlockWriter(
                    fd: try makeMemfd(), level: options.level, reservedHeaderBytes: headerBytes, expectedDataBytes: dataBytes)
            }
        } catch { throw blockFailure(error, path) }

        var tensors: [BlockTensor] = []
        var partialReasons: [String] = []
        var videoResult: VideoResult? = nil
        if let video {
            let decoded = try decodeVideo(video, demuxer: demuxer, request: request, writer: writer)
            videoResult = decoded.result
            partialReasons += decoded.partialReasons
            warnings += decoded.warnings
            tensors.append(
                BlockTensor(name: "video", dtype: .uint8, shape: decoded.result.shape, layout: options.layout.rawValue, frameSizes: []))
        }

        var audioResult: AudioResult? = nil
        if let audioIndex, let audioPlan {
            do {
                // The first demuxer has been read through by the video (or its origin scan). The
                // second reads the audio alone, so its probing leaves the video out.
                let audioDemuxer = videoIndex != nil
                    ? try Demuxer(path: request.path, displayPath: path, maxPixels: options.maxSourcePixels, probesVideo: false)
                    : demuxer
                let decoded = try decodeAudio(
                    audioDemuxer, streamIndex: audioIndex, plan: audioPlan, firstFramePts: videoResult?.pts.first,
                    path: path)
                try writeAudio(decoded.sink, tensor: tensors.count, writer: writer, path: path)
                audioResult = decoded.result
                partialReasons += decoded.partialReasons
                warnings += decoded.warnings
                tensors.append(
                    BlockTensor(name: "audio", dtype: .float32, shape: decoded.result.shape, layout: "CN", frameSizes: []))
            } catch where options.audioOptional && options.video && error.reason != .tooLarge
                && error.reason != .outOfMemory
            {
                warnings.append("no audio tensor (audio_optional): \(error.message)")
            }
        }

        let source = StreamInfo.source(demuxer, video: videoIndex, table: video?.table, audio: audioIndex)
        var result = DecodeResult(
            path: path, video: videoResult, audio: audioResult, source: source,
            partial: !partialReasons.isEmpty, partialDetail: partialReasons.isEmpty ? nil : partialReasons.joined(separator: "; "),
            warnings: warnings)
        result.decodeSeconds = monotonicSeconds() - started
        let size: Int
        do {
            size = try writer.finish(tensors: tensors, result: JSONCoding.encode(result))
        } catch { throw blockFailure(error, path) }
        if !writer.isInSlab {
            do { try SharedMemory.seal(writer.currentFD) } catch {
                throw DecodeFailure(.decodeError, "\(path): cannot seal the block: \(error)", path: path)
            }
        }
        return DecodedClip(result: result, block: writer.isInSlab ? nil : block, blockBytes: size)
    }

    // MARK: - Video

    /// A video stream checked, scanned, selected and sized: everything known before decoding.
    struct PreparedVideo {
        var streamIndex: Int
        var table: FrameTable
        var scanErrors: [String]
        var plan: FrameSelectionPlan
        var rotation: Int
        var rotationNote: String?
        var width: Int
        var height: Int
        var totalBytes: Int

        /// The time origin (the first presented frame) on the container clock, seconds.
        var originSeconds: Double { Double(table.originTicks) * av_q2d(table.timeBase) }
    }

    static func prepareVideo(
        _ demuxer: Demuxer, videoIndex: Int, options: DecodeOptions, path: String
    ) throws(DecodeFailure) -> PreparedVideo {
        let st = demuxer.stream(videoIndex)
        let par = st.pointee.codecpar.pointee
        if cffmpeg_stream_is_encrypted(st) != 0 {
            throw encrypted(path)
        }
        if avcodec_find_decoder(par.codec_id) == nil {
            throw DecodeFailure(
                .unsupported, "\(path): no decoder for the video codec '\(StreamInfo.name(of: par.codec_id))'",
                path: path, detail: FFLog.summary())
        }
        let sourceWidth = Int(par.width), sourceHeight = Int(par.height)
        if sourceWidth * sourceHeight > options.maxSourcePixels {
            throw DecodeFailure(
                .tooLarge,
                "\(path): video is \(sourceWidth)x\(sourceHeight) = \(sourceWidth * sourceHeight) pixels per frame, above the limit of \(options.maxSourcePixels)",
                path: path, detail: "max_source_pixels=\(options.maxSourcePixels)")
        }
        guard sourceWidth > 0, sourceHeight > 0 else {
            // The probing decoder refused a frame above the limit before it told the size.
            if let refusal = FFLog.errors(since: 0).first(where: { $0.contains("exceeds specified max pixel count") }) {
                throw DecodeFailure(
                    .tooLarge, "\(path): video frames are above the limit of \(options.maxSourcePixels) pixels (\(refusal))",
                    path: path, detail: "max_source_pixels=\(options.maxSourcePixels)")
            }
            throw DecodeFailure(
                .decodeError, "\(path): the video stream's frame size is unknown (FFmpeg could not parse its headers)",
                path: path, detail: FFLog.summary() ?? "width/height are 0 after avformat_find_stream_info")
        }

        let scanMark = FFLog.mark()
        let table = try FrameTable.scan(demuxer, streamIndex: videoIndex)
        let scanErrors = FFLog.errors(since: scanMark)
        if table.encrypted { throw encrypted(path) }
        guard table.count > 0 else {
            var detail = "no video packets could be read"
            if let e = table.readError { detail += ": \(e)" }
            if let logged = FFLog.summary() { detail += " | \(logged)" }
            throw DecodeFailure(.decodeError, "\(path): the video stream has no frames", path: path, detail: detail)
        }

        let plan = try select(table: table, options: options, path: path)
        let (rotation, rotationNote) = options.rotate ? StreamInfo.rotation(st) : (0, nil)
        let (width, height) = try outputSize(
            sourceWidth: sourceWidth, sourceHeight: sourceHeight, rotation: rotation, frames: plan.outputs.count,
            options: options, path: path)
        let (frameBytes, o1) = (3 * width).multipliedReportingOverflow(by: height)
        let (totalBytes, o2) = frameBytes.multipliedReportingOverflow(by: plan.outputs.count)
        if o1 || o2 || totalBytes > options.maxOutputBytes {
            throw DecodeFailure(
                .tooLarge,
                "\(path): \(plan.outputs.count) frames of \(width)x\(height) RGB need \(o1 || o2 ? "more than 2^63" : String(totalBytes)) bytes, above the limit of \(options.maxOutputBytes)",
                path: path, detail: "max_output_bytes=\(options.maxOutputBytes)")
        }
        return PreparedVideo(
            streamIndex: videoIndex, table: table, scanErrors: scanErrors, plan: plan, rotation: rotation,
            rotationNote: rotationNote, width: width, height: height, totalBytes: totalBytes)
    }

    /// Decodes the selected frames into the block (tensor 0) and reports on them.
    static func decodeVideo(
        _ video: PreparedVideo, demuxer: Demuxer, request: ClipRequest, writer: BlockWriter
    ) throws(DecodeFailure) -> (result: VideoResult, partialReasons: [String], warnings: [String]) {
        let options = request.options
        let path = request.displayPath
        let table = video.table
        let plan = video.plan
        let converter = FrameConverter(
            width: video.width, height: video.height, rotation: video.rotation, layout: options.layout)
        let buffers = FrameBuffers(frameBytes: converter.frameBytes, bufferBytes: converter.bufferBytes)
        let sink = FrameSink(outputs: plan.outputs, writer: writer, buffers: buffers, path: path)
        let lentDense = denseThreads(plan: plan, request: request)
        let threads = lentDense ?? options.threads
        let reopen = { () throws(DecodeFailure) in try Demuxer(path: request.path, displayPath: path, maxPixels: options.maxSourcePixels) }
        let wanted = Array(Set(plan.outputs)).sorted()
        let outcome: VideoFrameReader.Outcome
        var readers = 1
        if lentDense == nil, request.threadBudget > 1, video.totalBytes <= ParallelFrameReading.maxHeldBytes,
            let groups = ParallelFrameReading.groups(wanted, table: table, policy: request.access, parts: request.threadBudget)
        {
            // Sparse, with idle slots lent: whole readers in parallel (ParallelFrameReading).
            readers = groups.count
            outcome = try ParallelFrameReading.run(groups: groups, policy: request.access, sink: sink) { index throws(DecodeFailure) in
                try VideoFrameReader(
                    demuxer: index == 0 ? demuxer : try reopen(), reopen: reopen, streamIndex: video.streamIndex, table: table,
                    threads: threads, maxPixels: options.maxSourcePixels,
                    converter: index == 0
                        ? converter
                        : FrameConverter(width: video.width, height: video.height, rotation: video.rotation, layout: options.layout),
                    buffers: buffers, path: path)
            }
        } else {
            let reader = try VideoFrameReader(
                demuxer: demuxer, reopen: reopen, streamIndex: video.streamIndex, table: table, threads: threads,
                maxPixels: options.maxSourcePixels, converter: converter, buffers: buffers, path: path,
                convertsOnItsOwnThread: lentDense != nil)
            outcome = try reader.run(wanted: wanted, policy: request.access) { index, bytes, _ throws(DecodeFailure) in
                try sink.deliver(index, bytes)
            }
        }
        for index in outcome.missing { sink.markMissing(index) }
        try sink.finish()
        guard !sink.written.isEmpty else {
            var detail = "no requested frame could be decoded"
            if let logged = FFLog.summary() { detail += ": \(logged)" }
            throw DecodeFailure(.decodeError, "\(path): the video could not be decoded", path: path, detail: detail)
        }

        // Honest reporting: what is partial, and what only deserves a note.
        var partialReasons: [String] = []
        if !outcome.missing.isEmpty {
            let shown = outcome.missing.prefix(10).map(String.init).joined(separator: ", ")
            partialReasons.append(
                "\(outcome.missing.count) of \(wanted.count) requested frames did not decode (indices \(shown)\(outcome.missing.count > 10 ? ", ..." : ""))")
        }
        if let e = table.readError ?? outcome.readError {
            partialReasons.append("the demuxer stopped after \(table.packets.count) video packets: \(e)")
        }
        if outcome.corruptFrames > 0 {
            partialReasons.append("\(outcome.corruptFrames) returned frames were concealed by the decoder")
        }
        let errors = video.scanErrors + outcome.errors.filter { !video.scanErrors.contains($0) }
        if !errors.isEmpty {
            partialReasons.append("FFmpeg reported: " + errors.prefix(8).joined(separator: " | "))
        }
        var warnings: [String] = []
        if let nb = table.containerFrames, nb != table.count {
            var w = "the container says \(nb) frames; \(table.count) are presented"
            if table.hiddenCount > 0 {
                w += " (\(table.hiddenCount) packets are edit-list preroll, invisible frames or before the first keyframe)"
            }
            else if table.packets.count != nb { w += " (\(table.packets.count) packets in the file)" }
            warnings.append(w)
        }
        if table.leadingUndecodable > 0 {
            warnings.append(
                "\(table.leadingUndecodable) packets before the first keyframe cannot be decoded and are not counted as frames")
        }
        if table.timesFromDecodingOrder {
            warnings.append("the stream has no presentation timestamps: frame times come from its decoding timestamps")
        } else if !table.timed {
            warnings.append(
                "the stream has no timestamps: frame times are index / \(JSONValue.number(table.avgFps).jsonString) fps")
        }
        if let note = video.rotationNote { warnings.append(note) }
        warnings.append(contentsOf: outcome.notes)

        let t = sink.written.count
        let shape = options.layout == .tchw ? [t, 3, video.height, video.width] : [t, video.height, video.width, 3]
        let result = VideoResult(
            shape: shape, layout: options.layout, pts: sink.written.map { table.times[$0] }, indices: sink.written,
            sampleFps: plan.sampleFps, width: video.width, height: video.height, rotationApplied: video.rotation,
            framesInRange: plan.framesInRange, access: outcome.usedSeek ? "seek" : "sequential", decoderThreads: threads,
            readers: readers, conversionThread: lentDense != nil)
        return (result, partialReasons, warnings)
    }

    /// Decoder threads for a selection that wants at least half the frames of its range and
    /// was lent idle slots (`threadBudget` > 1); nil for anything else (a sparse selection with
    /// slots gets parallel readers instead). Such a clip converts and writes its frames on a
    /// thread of their own beside the decoder (`ConversionStage`), which takes one of the slots;
    /// the rest become frame threads. With 2 slots, one decoder thread and the stage beat two
    /// frame threads at every size measured (docs/benchmarks.md, eighth session): 320x240
    /// every frame 14.0 against 16.1 ms per clip, 640x360 63 against 79 ms, 720p 84 against
    /// 114 ms, 720p scaled to 588x336 161 against 210 ms. Frame threads leave the conversion
    /// and the write into shared memory on the thread that decodes; the stage takes them off it.
    static func denseThreads(plan: FrameSelectionPlan, request: ClipRequest) -> Int? {
        let wanted = Set(plan.outputs).count
        let dense = plan.framesInRange > 0 && 2 * wanted >= plan.framesInRange
        guard request.threadBudget > 1, dense else { return nil }
        return request.threadBudget - 1
    }

    // MARK: - Selection

    /// The frames a request selects among the table's frames (docs/decoding.md).
    static func select(table: FrameTable, options: DecodeOptions, path: String) throws(DecodeFailure) -> FrameSelectionPlan {
        let range = table.range(start: options.start, end: options.end)
        let total = range.count
        func invalid(_ message: String, _ field: String) -> DecodeFailure {
            DecodeFailure(.invalidRequest, "\(path): \(message)", path: path, detail: field)
        }
        if case .timestamps(let times) = options.selection {
            var outputs: [Int] = []
            for t in times {
                if let s = options.start, t < s { throw invalid("timestamp \(t) s is before 'start' (\(s) s)", "timestamps") }
                if let e = options.end, t >= e { throw invalid("timestamp \(t) s is not before 'end' (\(e) s)", "timestamps") }
                guard let index = table.frameShown(at: t) else {
                    throw invalid(
                        "timestamp \(t) s is past the end of the video stream (\(JSONValue.number(table.endTime).jsonString) s)",
                        "timestamps")
                }
                outputs.append(index)
            }
            let fps = total > 0 ? Double(outputs.count) / Double(total) * table.avgFps : table.avgFps
            return FrameSelectionPlan(outputs: outputs, sampleFps: fps, framesInRange: total)
        }
        guard total > 0 else {
            throw invalid(
                "no frames in [\(options.start ?? 0), \(options.end.map { "\($0)" } ?? "end")) s (the video's frames span 0 to \(JSONValue.number(table.endTime).jsonString) s)",
                options.start != nil ? "start" : "end")
        }
        let factor = options.frameFactor
        let n: Int
        switch options.selection {
        case .rate(let fps):
            n = Sampling.framesForRate(
                total: total, avgFps: table.avgFps, fps: fps, minFrames: options.minFrames,
                maxFrames: options.maxFrames, factor: factor)
        case .count(let requested):
            n = Sampling.framesForCount(requested, factor: factor)
        case .timestamps:
            n = 0
        }
        guard n >= max(factor, 1), n <= total else {
            throw invalid(
                "\(total) frame(s) in range give \(n) frames to sample; need between frame_factor (\(factor)) and \(total)",
                "frames")
        }
        let indices = Sampling.linspaceIndices(first: range.lowerBound, last: range.upperBound - 1, count: n)
        return FrameSelectionPlan(
            outputs: indices, sampleFps: Double(n) / Double(total) * table.avgFps, framesInRange: total)
    }

    /// Output width and height of the upright frames.
    static func outputSize(
        sourceWidth: Int, sourceHeight: Int, rotation: Int, frames: Int, options: DecodeOptions, path: String
    ) throws(DecodeFailure) -> (Int, Int) {
        let swapped = rotation == 90 || rotation == 270
        let uprightWidth = swapped ? sourceHeight : sourceWidth
        let uprightHeight = swapped ? sourceWidth : sourceHeight
        if let w = options.width, let h = options.height { return (w, h) }
        if options.maxPixels != nil || options.minPixels != nil || options.totalPixels != nil {
            let bounds = Sampling.videoPixelBounds(
                frames: frames, minPixels: options.minPixels, maxPixels: options.maxPixels,
                totalPixels: options.totalPixels, frameFactor: options.frameFactor)
            guard let size = Sampling.smartResize(
                height: uprightHeight, width: uprightWidth, factor: options.factor, minPixels: bounds.min,
                maxPixels: bounds.max)
            else {
                throw DecodeFailure(
                    .invalidRequest,
                    "\(path): aspect ratio of \(uprightWidth)x\(uprightHeight) is above \(Int(Sampling.maxRatio)), which smart_resize refuses",
                    path: path, detail: "max_pixels")
            }
            return (size.width, size.height)
        }
        return (uprightWidth, uprightHeight)
    }

    // MARK: - Helpers

    private static func encrypted(_ path: String) -> DecodeFailure {
        DecodeFailure(
            .unsupported, "\(path): the video stream is encrypted (CENC/CBCS); it cannot be decoded without its key",
            path: path, detail: "encryption side data on the stream or its packets")
    }

    private static func blockFailure(_ error: BlockError, _ path: String) -> DecodeFailure {
        DecodeFailure(
            error.outOfMemory ? .outOfMemory : .decodeError, "\(path): cannot write the block: \(error.message)", path: path,
            detail: error.message)
    }

    static func describeStreams(_ demuxer: Demuxer) -> String {
        var kinds: [String] = []
        for i in 0..<demuxer.streamCount {
            let st = demuxer.stream(i)
            let par = st.pointee.codecpar.pointee
            let kind: String =
                switch par.codec_type {
                case AVMEDIA_TYPE_VIDEO: st.pointee.disposition & AV_DISPOSITION_ATTACHED_PIC != 0 ? "cover art" : "video"
                case AVMEDIA_TYPE_AUDIO: "audio"
                case AVMEDIA_TYPE_SUBTITLE: "subtitles"
                default: "data"
                }
            kinds.append("\(kind) (\(StreamInfo.name(of: par.codec_id)))")
        }
        return kinds.isEmpty ? "no streams" : kinds.joined(separator: ", ")
    }
}

/// Writes converted frames into the block in output order, holding early ones until their turn,
/// and gives each frame's buffer back to `buffers` once it is written for the last time.
final class FrameSink {
    let outputs: [Int]
    private let writer: BlockWriter
    private let buffers: FrameBuffers
    private let path: String
    private var held: [Int: [UInt8]] = [:]
    private var usesLeft: [Int: Int] = [:]
    private var missing = Set<Int>()
    private var next = 0
    /// Presentation indices written, in order.
    private(set) var written: [Int] = []

    init(outputs: [Int], writer: BlockWriter, buffers: FrameBuffers, path: String) {
        self.outputs = outputs
        self.writer = writer
        self.buffers = buffers
        self.path = path
        for index in outputs { usesLeft[index, default: 0] += 1 }
    }

    func deliver(_ index: Int, _ bytes: [UInt8]) throws(DecodeFailure) {
        held[index] = bytes
        try flush()
    }

    func markMissing(_ index: Int) { missing.insert(index) }

    func finish() throws(DecodeFailure) {
        try flush()
        // Anything still unwritten has no frame: skip it (reported as missing by the reader).
        while next < outputs.count {
            if held[outputs[next]] != nil { try flush() } else { next += 1 }
        }
    }

    private func flush() throws(DecodeFailure) {
        while next < outputs.count {
            let index = outputs[next]
            if missing.contains(index) {
                next += 1
                continue
            }
            guard let bytes = held[index] else { return }
            do {
                try bytes.withUnsafeBytes { raw in
                    try writer.append(tensor: 0, UnsafeRawBufferPointer(rebasing: raw[..<buffers.frameBytes]))
                }
            } catch {
                let message = (error as? BlockError)?.message ?? "\(error)"
                throw DecodeFailure(.decodeError, "\(path): cannot write the block: \(message)", path: path)
            }
            written.append(index)
            usesLeft[index]! -= 1
            if usesLeft[index] == 0, let done = held.removeValue(forKey: index) { buffers.give(done) }
            next += 1
        }
    }
}

/// Buffers for converted frames, reused within a clip: a new array per frame cost a malloc,
/// the first touch of fresh pages and a free each time (about 1 % of a worker's CPU on W2,
/// docs/benchmarks.md); a clip in order needs one or two. Shared by the readers of a clip,
/// which may run on several threads (`ParallelFrameReading`), hence the lock.
final class FrameBuffers: @unchecked Sendable {
    /// The converted frame: the first `frameBytes` bytes of each buffer.
    let frameBytes: Int
    /// A buffer's size: the frame and the bytes past it that the converter may overwrite
    /// (`FrameConverter.bufferBytes`).
    let bufferBytes: Int
    /// Buffers kept for reuse at most; frames held out of order beyond that are freed.
    static let kept = 8
    private let spare = Mutex<[[UInt8]]>([])

    init(frameBytes: Int, bufferBytes: Int) {
        precondition(bufferBytes >= frameBytes)
        self.frameBytes = frameBytes
        self.bufferBytes = bufferBytes
    }

    /// A buffer of `bufferBytes` bytes whose contents are undefined: the converter writes every
    /// byte of the frame, so a new one is not zero-filled first.
    func take() -> [UInt8] {
        if let reused = spare.withLock({ $0.popLast() }) { return reused }
        return [UInt8](unsafeUninitializedCapacity: bufferBytes) { _, count in count = bufferBytes }
    }

    /// Takes back a buffer nothing reads any more.
    func give(_ buffer: [UInt8]) {
        guard buffer.count == bufferBytes else { return }
        spare.withLock { if $0.count < Self.kept { $0.append(buffer) } }
    }
}
