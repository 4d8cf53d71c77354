import ArgumentParser

/// The decode options of the command line. Each long option is a protocol key with `_` → `-`
/// (docs/protocol.md); they are gathered into protocol JSON and read by `DecodeOptions(json:)`,
/// so the CLI and the protocol share one vocabulary and one validator.
public struct DecodeArguments: ParsableArguments, Sendable {
    public init() {}

    @Option(help: "Target frame rate: Qwen2.5-VL's rule picks n frames evenly over the range (default 2.0).")
    public var fps: Double?

    @Option(help: "Take N frames evenly over the range (rounded to --frame-factor), instead of --fps.")
    public var frames: Int?

    @Option(help: ArgumentHelp(
        "Comma-separated times in seconds: the frame shown at each time, instead of --fps.",
        valueName: "t,t,..."))
    public var timestamps: String?

    @Option(help: "Start of the range, seconds from the first frame (which is at 0).")
    public var start: Double?

    @Option(help: "End of the range (exclusive), seconds from the first frame.")
    public var end: Double?

    @Option(help: "With --fps: at least this many frames (rounded up to --frame-factor; default 4).")
    public var minFrames: Int?

    @Option(help: "With --fps: at most this many frames (rounded down to --frame-factor; default 768).")
    public var maxFrames: Int?

    @Option(help: "Frame counts are multiples of this (Qwen's temporal patch; default 2).")
    public var frameFactor: Int?

    @Option(help: "Exact output width in pixels (with --height).")
    public var width: Int?

    @Option(help: "Exact output height in pixels (with --width).")
    public var height: Int?

    @Option(help: "Qwen smart_resize: at most this many pixels per frame (also bounded by the video budget).")
    public var maxPixels: Int?

    @Option(help: "Qwen smart_resize: at least this many pixels per frame (default 128·28·28).")
    public var minPixels: Int?

    @Option(help: "Qwen video budget over all frames (default 128000·28·28·0.9).")
    public var totalPixels: Int?

    @Option(help: "smart_resize: both sides are multiples of this (default 28).")
    public var factor: Int?

    @Option(help: "Tensor layout: TCHW (planar RGB per frame, default) or THWC (packed RGB).")
    public var layout: String?

    @Flag(help: "Keep the stored orientation: do not apply the display-matrix rotation.")
    public var noRotate = false

    @Option(help: "Decoder threads (default 1: parallelism comes from running several workers; 0 = FFmpeg's choice).")
    public var threads: Int?

    @Option(help: "zstd level of the block's frames (default -1000: stored raw, the fastest for the shared-memory hop).")
    public var level: Int?

    @Option(help: "Refuse sources with more pixels per frame than this (default 8192·8192), before allocating: too_large.")
    public var maxSourcePixels: Int?

    @Option(help: "Refuse outputs larger than this many bytes (default 4 GiB), before decoding: too_large.")
    public var maxOutputBytes: Int?

    @Flag(help: "Also decode the best audio stream: float32, planar (channels, samples), resampled to --sample-rate and --channels.")
    public var audio = false

    @Flag(help: "With --audio: no video.")
    public var noVideo = false

    @Flag(help: "With --audio: a clip without audio decodes anyway.")
    public var audioOptional = false

    @Option(help: "Audio sample rate (with --audio; default 16000).")
    public var sampleRate: Int?

    @Option(help: "Audio channels (with --audio; default 1).")
    public var channels: Int?

    @Option(name: .customLong("options-json"), help: ArgumentHelp(
        "Decode options as one protocol JSON object (keys of docs/protocol.md, e.g. '{\"fps\":1}'); options given as flags override its keys.",
        valueName: "object"))
    public var json: String?

    /// The options as protocol keys: `--options-json` first, then each flag given.
    public func protocolFields() throws(DecodeFailure) -> [String: JSONValue] {
        var fields: [String: JSONValue] = [:]
        if let json {
            let parsed: JSONValue
            do { parsed = try JSONValue.parse(Array(json.utf8)) } catch {
                throw FieldReader.invalid("options-json", error.message)
            }
            guard case .object(let object) = parsed else { throw FieldReader.invalid("options-json", "expected a JSON object") }
            for key in object.keys where !DecodeOptions.protocolKeys.contains(key) {
                throw FieldReader.invalid(key, "unknown decode option")
            }
            fields = object
        }
        func put(_ key: String, _ value: Int?) { if let value { fields[key] = .number(Double(value)) } }
        func put(_ key: String, _ value: Double?) { if let value { fields[key] = .number(value) } }
        put("fps", fps)
        put("frames", frames)
        if let timestamps {
            var list: [JSONValue] = []
            for part in timestamps.split(separator: ",", omittingEmptySubsequences: false) {
                let text = part.trimming(" ")
                guard let value = Double(text) else {
                    throw FieldReader.invalid("timestamps", "'\(text)' is not a number")
                }
                list.append(.number(value))
            }
            fields["timestamps"] = .array(list)
        }
        if fps != nil || frames != nil || timestamps != nil {
            // A mode given as a flag replaces any mode from --options-json.
            if fps == nil { fields["fps"] = nil }
            if frames == nil { fields["frames"] = nil }
            if timestamps == nil { fields["timestamps"] = nil }
        }
        put("start", start)
        put("end", end)
        put("min_frames", minFrames)
        put("max_frames", maxFrames)
        put("frame_factor", frameFactor)
        put("width", width)
        put("height", height)
        put("max_pixels", maxPixels)
        put("min_pixels", minPixels)
        put("total_pixels", totalPixels)
        put("factor", factor)
        if let layout { fields["layout"] = .string(layout) }
        if noRotate { fields["no_rotate"] = true }
        put("threads", threads)
        put("level", level)
        put("max_source_pixels", maxSourcePixels)
        put("max_output_bytes", maxOutputBytes)
        if audio { fields["audio"] = true }
        if noVideo { fields["no_video"] = true }
        if audioOptional { fields["audio_optional"] = true }
        put("sample_rate", sampleRate)
        put("channels", channels)
        return fields
    }

    /// Parsed and validated options.
    public func decodeOptions() throws(DecodeFailure) -> DecodeOptions {
        try DecodeOptions(json: try protocolFields())
    }
}

