import ArgumentParser

/// The decode options as command-line flags, shared by `clipvisor-worker decode` and
/// `clipvisor decode` so both executables speak one vocabulary (protocol key = long option
/// with `-` → `_`).
public struct DecodeArguments: ParsableArguments, Sendable {
    @Flag(help: "Also decode the best audio stream (float32, planar (channels, samples)).")
    public var audio = false

    @Flag(name: .customLong("no-video"), help: "Decode audio only (with --audio).")
    public var noVideo = false

    @Flag(help: "With --audio: a clip without audio decodes anyway, with no audio tensor.")
    public var audioOptional = false

    @Option(help: ArgumentHelp("Start of the range, seconds from the start of the media (the first frame is 0).", valueName: "seconds"))
    public var start: Double?

    @Option(help: ArgumentHelp("End of the range (exclusive), seconds.", valueName: "seconds"))
    public var end: Double?

    @Option(help: "Target frame rate (Qwen2.5-VL rule, bounded by --min-frames/--max-frames). Default 2.0 unless --frames or --timestamps.")
    public var fps: Double?

    @Option(help: "Return this many frames, evenly spread (rounded to --frame-factor).")
    public var frames: Int?

    @Option(help: ArgumentHelp("Return the frame shown at each of these times (comma-separated seconds).", valueName: "t,t,..."))
    public var timestamps: String?

    @Option(help: "Lower bound of the frame count in fps mode (rounded up to --frame-factor).")
    public var minFrames: Int = 4

    @Option(help: "Upper bound of the frame count in fps mode (rounded down to --frame-factor).")
    public var maxFrames: Int = 768

    @Option(help: "Frame counts are multiples of this.")
    public var frameFactor: Int = 2

    @Option(help: "Exact output width (with --height).")
    public var width: Int?

    @Option(help: "Exact output height (with --width).")
    public var height: Int?

    @Option(help: "Pixel budget per frame (Qwen smart_resize; video budget rules).")
    public var maxPixels: Int?

    @Option(help: "Minimum pixels per frame (smart_resize).")
    public var minPixels: Int?

    @Option(help: "Pixel budget for all frames together (Qwen's VIDEO_TOTAL_PIXELS).")
    public var totalPixels: Int?

    @Option(help: "Output sides are multiples of this (smart_resize).")
    public var factor: Int = 28

    @Option(help: "Video tensor layout: TCHW or THWC.")
    public var layout: String = "TCHW"

    @Flag(name: .customLong("no-rotate"), help: "Keep the stored orientation (do not apply the display-matrix rotation).")
    public var noRotate = false

    @Option(help: "Decoder threads (the pool already decodes clips in parallel).")
    public var threads: Int = 1

    @Option(help: "zstd level of the block (−1000 stores; 3 compresses for disk caches).")
    public var level: Int = BlockFormat.defaultLevel

    @Option(help: "Audio output sample rate, Hz.")
    public var sampleRate: Int = 16_000

    @Option(help: "Audio output channels (downmixed by the standard matrix).")
    public var channels: Int = 1

    @Option(help: "Refuse sources with more pixels per frame (answers too_large before allocating).")
    public var maxSourcePixels: Int = 8192 * 8192

    @Option(help: "Refuse outputs larger than this many bytes (answers too_large before decoding).")
    public var maxOutputBytes: Int = 4 << 30

    public init() {}

    /// The validated options; errors name the flag's protocol key.
    public func options() throws(DecodeFailure) -> DecodeOptions {
        var options = DecodeOptions()
        options.audio = audio
        options.video = !noVideo
        options.audioOptional = audioOptional
        options.start = start
        options.end = end
        let modes = [fps != nil, frames != nil, timestamps != nil].filter { $0 }.count
        if modes > 1 { throw FieldReader.invalid("fps", "give only one of --fps, --frames and --timestamps") }
        if let fps {
            guard fps > 0, fps.isFinite else { throw FieldReader.invalid("fps", "must be positive") }
            options.selection = .rate(fps: fps)
        }
        if let frames {
            guard frames >= 1 else { throw FieldReader.invalid("frames", "must be at least 1") }
            options.selection = .count(frames)
        }
        if let timestamps {
            var list: [Double] = []
            for item in timestamps.split(separator: ",") {
                guard let value = Double(item.trimmingSpaces()), value >= 0, value.isFinite else {
                    throw FieldReader.invalid("timestamps", "\"\(item)\" is not a time in seconds")
                }
                list.append(value)
            }
            options.selection = .timestamps(list)
        }
        options.minFrames = minFrames
        options.maxFrames = maxFrames
        options.frameFactor = frameFactor
        options.width = width
        options.height = height
        options.maxPixels = maxPixels
        options.minPixels = minPixels
        options.totalPixels = totalPixels
        options.factor = factor
        guard let parsedLayout = DecodeOptions.Layout(rawValue: layout.uppercased()) else {
            throw FieldReader.invalid("layout", "must be TCHW or THWC, got \(layout)")
        }
        options.layout = parsedLayout
        options.rotate = !noRotate
        options.threads = threads
        options.level = level
        options.sampleRate = sampleRate
        options.channels = channels
        options.maxSourcePixels = maxSourcePixels
        options.maxOutputBytes = maxOutputBytes
        // The protocol parser checks every range; run the options through it so both paths agree.
        return try DecodeOptions(json: options.json)
    }
}

extension Substring {
    func trimmingSpaces() -> Substring {
        var slice = self
        while slice.first == " " { slice = slice.dropFirst() }
        while slice.last == " " { slice = slice.dropLast() }
        return slice
    }
}
