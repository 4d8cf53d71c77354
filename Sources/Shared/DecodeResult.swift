/// What a decode produced, besides the tensors themselves: the metadata a training loop needs
/// to use the frames correctly (which frames, at what times, from what source). The worker
/// prints it, the block header carries it, the supervisor forwards it. Keys are snake_case.
public struct DecodeResult: Sendable, Equatable, Codable {
    /// The clip as the request named it (for fd requests, the name given for logs).
    public var path: String
    public var video: VideoResult?
    public var audio: AudioResult?
    public var source: SourceInfo
    /// The stream was damaged: what is returned was decoded up to the damage.
    public var partial: Bool
    /// What was wrong, when `partial` (FFmpeg's message, the frames missing...).
    public var partialDetail: String?
    /// Honest notes that do not make the result partial (e.g. the container's frame count
    /// differs from what decodes).
    public var warnings: [String]
    /// Wall time the worker spent on this clip, seconds.
    public var decodeSeconds: Double

    public init(
        path: String, video: VideoResult? = nil, audio: AudioResult? = nil, source: SourceInfo,
        partial: Bool = false, partialDetail: String? = nil, warnings: [String] = [],
        decodeSeconds: Double = 0
    ) {
        self.path = path
        self.video = video
        self.audio = audio
        self.source = source
        self.partial = partial
        self.partialDetail = partialDetail
        self.warnings = warnings
        self.decodeSeconds = decodeSeconds
    }
}

/// The video tensor: uint8 RGB frames.
public struct VideoResult: Sendable, Equatable, Codable {
    /// `[T, 3, H, W]` for TCHW, `[T, H, W, 3]` for THWC.
    public var shape: [Int]
    public var layout: DecodeOptions.Layout
    /// Presentation time of each returned frame, seconds from the start of the media.
    public var pts: [Double]
    /// Index of each returned frame among all frames of the stream, in presentation order.
    public var indices: [Int]
    /// The rate the returned frames represent: n / frames_in_range × avg_fps (Qwen's sample_fps).
    public var sampleFps: Double
    /// Output size after resize and rotation.
    public var width: Int
    public var height: Int
    /// Degrees of clockwise rotation applied to upright the frames (0 with no_rotate).
    public var rotationApplied: Int
    /// Frames of the stream inside [start, end) on which selection was computed.
    public var framesInRange: Int
    /// "seek" when frames were reached by seeking to keyframes, "sequential" otherwise.
    public var access: String
    /// Decoder threads used: the request's `threads`, or more when the worker was given idle
    /// slots (`WorkerJob.threadBudget`). Absent in results of older workers.
    public var decoderThreads: Int?
    /// Readers that decoded the clip in parallel, each from its own keyframes (a sparse
    /// selection given idle slots); 1 normally. Absent in results of older workers.
    public var readers: Int?
    /// The frames were converted and written on a thread of their own beside the decoder (a
    /// dense selection given idle slots). Absent in results of older workers.
    public var conversionThread: Bool?

    public init(
        shape: [Int], layout: DecodeOptions.Layout, pts: [Double], indices: [Int], sampleFps: Double,
        width: Int, height: Int, rotationApplied: Int, framesInRange: Int, access: String, decoderThreads: Int? = nil,
        readers: Int? = nil, conversionThread: Bool? = nil
    ) {
        self.shape = shape
        self.layout = layout
        self.pts = pts
        self.indices = indices
        self.sampleFps = sampleFps
        self.width = width
        self.height = height
        self.rotationApplied = rotationApplied
        self.framesInRange = framesInRange
        self.access = access
        self.decoderThreads = decoderThreads
        self.readers = readers
        self.conversionThread = conversionThread
    }
}

/// The audio tensor: float32, planar `(channels, samples)`.
public struct AudioResult: Sendable, Equatable, Codable {
    /// `[channels, samples]`.
    public var shape: [Int]
    public var sampleRate: Int
    public var channels: Int
    /// Time of the first sample, seconds from the start of the media.
    public var start: Double
    /// `start` minus the first returned video frame's pts, when video was decoded too.
    public var offsetFromFirstFrame: Double?
    /// Time of the stream's first decoded sample (encoder delay already trimmed), same origin.
    /// Samples before it in the tensor are silence.
    public var streamStart: Double?
    /// End of the decoded stream (last sample's time plus one sample period), same origin.
    public var streamEnd: Double?
    /// Seconds of silence in the tensor where the stream had no audio: before its first sample,
    /// in timestamp gaps, after its end (docs/decoding.md, "Audio").
    public var paddedSeconds: Double?
    /// Seconds of decoded audio left out because their timestamps overlapped audio already placed.
    public var droppedSeconds: Double?

    public init(
        shape: [Int], sampleRate: Int, channels: Int, start: Double, offsetFromFirstFrame: Double? = nil,
        streamStart: Double? = nil, streamEnd: Double? = nil, paddedSeconds: Double? = nil,
        droppedSeconds: Double? = nil
    ) {
        self.shape = shape
        self.sampleRate = sampleRate
        self.channels = channels
        self.start = start
        self.offsetFromFirstFrame = offsetFromFirstFrame
        self.streamStart = streamStart
        self.streamEnd = streamEnd
        self.paddedSeconds = paddedSeconds
        self.droppedSeconds = droppedSeconds
    }
}

/// The source as probed, before any selection or resize.
public struct SourceInfo: Sendable, Equatable, Codable {
    public var container: String?
    /// Seconds; nil when neither the container nor the streams say.
    public var duration: Double?
    public var sizeBytes: Int?
    public var videoCodec: String?
    public var width: Int?
    public var height: Int?
    public var pixelFormat: String?
    /// Average frame rate of the video stream.
    public var fps: Double?
    /// Frames in the whole video stream.
    public var frameCount: Int?
    /// "container" when the container's count was trusted, "packets" when counted from packets.
    public var frameCountSource: String?
    /// Display-matrix rotation of the stream, degrees clockwise to upright it.
    public var rotation: Int?
    public var audioCodec: String?
    public var audioSampleRate: Int?
    public var audioChannels: Int?
    /// Channel layout of the audio stream as FFmpeg names it ("stereo", "5.1(side)").
    public var audioChannelLayout: String?
    /// Duration of the audio stream as the container states it, seconds (decoding may disagree:
    /// see the result's warnings).
    public var audioDuration: Double?

    public init() {}
}
