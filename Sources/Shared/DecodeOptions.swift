/// What to decode from one clip. The same values arrive as worker command-line options
/// (`--min-frames 4`) and as protocol keys (`"min_frames": 4`): a protocol key is the long
/// option with `-` turned into `_`, so there is one vocabulary and one validator for both.
public struct DecodeOptions: Sendable, Equatable {
    /// Tensor layout of the video frames.
    public enum Layout: String, Sendable, Codable, CaseIterable {
        /// frames × channels × height × width: what torchvision and Qwen's processor expect.
        case tchw = "TCHW"
        /// frames × height × width × channels: packed RGB, as decord and PyAV return.
        case thwc = "THWC"
    }

    /// Which frames to return.
    public enum FrameSelection: Sendable, Equatable {
        /// A target rate, bounded by a frame count range (the Qwen2.5-VL rule).
        case rate(fps: Double)
        /// A frame count, rounded to `frameFactor`, spread evenly over the range.
        case count(Int)
        /// The frame shown at each of these times (seconds, same origin as `start`).
        case timestamps([Double])
    }

    public var video = true
    public var audio = false
    /// With `audio`, a clip without an audio stream is decoded anyway (no audio tensor)
    /// instead of failing with `unsupported`.
    public var audioOptional = false
    public var start: Double?
    public var end: Double?
    public var selection: FrameSelection = .rate(fps: 2.0)
    public var minFrames = 4
    public var maxFrames = 768
    public var frameFactor = 2
    public var width: Int?
    public var height: Int?
    public var maxPixels: Int?
    public var minPixels: Int?
    public var totalPixels: Int?
    public var factor = 28
    public var layout: Layout = .tchw
    public var rotate = true
    /// Decoder threads inside one worker; 1 by default because the pool supplies parallelism.
    public var threads = 1
    /// zstd level of the block's frames; see docs/block-format.md for why the default is what it is.
    public var level = BlockFormat.defaultLevel
    public var sampleRate = 16_000
    public var channels = 1
    /// Sources with more pixels per frame are refused before any frame is allocated.
    public var maxSourcePixels = 8192 * 8192
    /// Outputs whose tensors would exceed this are refused before decoding.
    public var maxOutputBytes = 4 << 30

    public init() {}

    /// Every key `init(json:)` accepts, for "unknown field" errors and documentation.
    public static let protocolKeys: Set<String> = [
        "audio", "no_video", "audio_optional", "start", "end", "fps", "frames", "timestamps",
        "min_frames", "max_frames", "frame_factor", "width", "height", "max_pixels", "min_pixels",
        "total_pixels", "factor", "layout", "no_rotate", "threads", "level", "sample_rate",
        "channels", "max_source_pixels", "max_output_bytes",
    ]

    /// Frames one clip may return (and timestamps one request may list). The job and the
    /// worker's answer, which lists every frame's pts and index, must each fit one datagram
    /// of the worker channel (WorkerMessage.channelBufferBytes); 10 000 frames need ~260 kB.
    public static let maxFramesPerClip = 10_000

    /// Longest side of an exact output size: swscale refuses wider images (~20 000 pixels), and
    /// no model input comes near it.
    public static let maxOutputSide = 16_384

    /// Reads the decode keys of a request object. Keys outside `protocolKeys` are left for the
    /// caller (the supervisor owns `path`, `deadline_ms`, `tag`...), which rejects what it does not know.
    public init(json fields: [String: JSONValue]) throws(DecodeFailure) {
        let reader = FieldReader(fields)
        if let v = try reader.bool("audio") { audio = v }
        if let v = try reader.bool("no_video") { video = !v }
        if let v = try reader.bool("audio_optional") { audioOptional = v }
        start = try reader.double("start", min: 0)
        end = try reader.double("end", min: 0)
        let fps = try reader.double("fps", min: 1e-6, max: 1000)
        let frames = try reader.int("frames", min: 1, max: Self.maxFramesPerClip)
        let timestamps = try reader.doubles("timestamps", min: 0, maxCount: Self.maxFramesPerClip)
        let modes = [fps != nil, frames != nil, timestamps != nil].filter { $0 }.count
        if modes > 1 {
            throw FieldReader.invalid("fps", "give only one of 'fps', 'frames' and 'timestamps'")
        }
        if let fps { selection = .rate(fps: fps) }
        if let frames { selection = .count(frames) }
        if let timestamps { selection = .timestamps(timestamps) }
        if let v = try reader.int("min_frames", min: 1, max: Self.maxFramesPerClip) { minFrames = v }
        if let v = try reader.int("max_frames", min: 1, max: Self.maxFramesPerClip) { maxFrames = v }
        if let v = try reader.int("frame_factor", min: 1, max: 1024) { frameFactor = v }
        width = try reader.int("width", min: 1, max: Self.maxOutputSide)
        height = try reader.int("height", min: 1, max: Self.maxOutputSide)
        maxPixels = try reader.int("max_pixels", min: 1, max: 1 << 40)
        minPixels = try reader.int("min_pixels", min: 1, max: 1 << 40)
        totalPixels = try reader.int("total_pixels", min: 1, max: 1 << 50)
        if let v = try reader.int("factor", min: 1, max: 4096) { factor = v }
        if let v = try reader.string("layout") {
            guard let parsed = Layout(rawValue: v.uppercased()) else {
                throw FieldReader.invalid("layout", "must be \"TCHW\" or \"THWC\", got \"\(v)\"")
            }
            layout = parsed
        }
        if let v = try reader.bool("no_rotate") { rotate = !v }
        if let v = try reader.int("threads", min: 0, max: 256) { threads = v }
        if let v = try reader.int("level", min: BlockFormat.minLevel, max: BlockFormat.maxLevel) {
            level = v
        }
        if let v = try reader.int("sample_rate", min: 1000, max: 768_000) { sampleRate = v }
        if let v = try reader.int("channels", min: 1, max: 64) { channels = v }
        if let v = try reader.int("max_source_pixels", min: 1, max: 1 << 40) { maxSourcePixels = v }
        if let v = try reader.int("max_output_bytes", min: 1, max: 1 << 50) { maxOutputBytes = v }
        try validate()
    }

    /// Rules that involve more than one field. Errors name the field to change.
    public func validate() throws(DecodeFailure) {
        if !video && !audio {
            throw FieldReader.invalid("no_video", "nothing to decode: 'no_video' without 'audio'")
        }
        if let start, let end, end <= start {
            throw FieldReader.invalid("end", "must be after 'start' (\(start)), got \(end)")
        }
        if (width == nil) != (height == nil) {
            throw FieldReader.invalid(width == nil ? "width" : "height", "'width' and 'height' go together")
        }
        if width != nil, maxPixels != nil || minPixels != nil || totalPixels != nil {
            throw FieldReader.invalid(
                "width", "give either 'width'/'height' or a pixel budget ('max_pixels'...), not both")
        }
        if let minPixels, let maxPixels, minPixels > maxPixels {
            throw FieldReader.invalid("min_pixels", "must not exceed 'max_pixels' (\(maxPixels))")
        }
        if minFrames > maxFrames {
            throw FieldReader.invalid("min_frames", "must not exceed 'max_frames' (\(maxFrames))")
        }
        if case .timestamps(let list) = selection, list.isEmpty {
            throw FieldReader.invalid("timestamps", "must not be empty")
        }
    }

    /// The options as protocol keys, with defaults left out: what the supervisor forwards to a
    /// worker and what a client may send.
    public var json: [String: JSONValue] {
        let defaults = DecodeOptions()
        var out: [String: JSONValue] = [:]
        if audio { out["audio"] = true }
        if !video { out["no_video"] = true }
        if audioOptional { out["audio_optional"] = true }
        if let start { out["start"] = .number(start) }
        if let end { out["end"] = .number(end) }
        switch selection {
        case .rate(let fps): out["fps"] = .number(fps)
        case .count(let n): out["frames"] = .number(Double(n))
        case .timestamps(let list): out["timestamps"] = .array(list.map { .number($0) })
        }
        func put(_ key: String, _ value: Int, _ fallback: Int) {
            if value != fallback { out[key] = .number(Double(value)) }
        }
        func put(_ key: String, _ value: Int?) {
            if let value { out[key] = .number(Double(value)) }
        }
        put("min_frames", minFrames, defaults.minFrames)
        put("max_frames", maxFrames, defaults.maxFrames)
        put("frame_factor", frameFactor, defaults.frameFactor)
        put("width", width)
        put("height", height)
        put("max_pixels", maxPixels)
        put("min_pixels", minPixels)
        put("total_pixels", totalPixels)
        put("factor", factor, defaults.factor)
        if layout != defaults.layout { out["layout"] = .string(layout.rawValue) }
        if !rotate { out["no_rotate"] = true }
        put("threads", threads, defaults.threads)
        put("level", level, defaults.level)
        put("sample_rate", sampleRate, defaults.sampleRate)
        put("channels", channels, defaults.channels)
        put("max_source_pixels", maxSourcePixels, defaults.maxSourcePixels)
        put("max_output_bytes", maxOutputBytes, defaults.maxOutputBytes)
        return out
    }
}

/// Typed access to a request's fields that fails with `invalid_request` naming the field.
public struct FieldReader {
    public let fields: [String: JSONValue]

    public init(_ fields: [String: JSONValue]) { self.fields = fields }

    /// An `invalid_request` failure about one field.
    public static func invalid(_ field: String, _ problem: String) -> DecodeFailure {
        DecodeFailure(.invalidRequest, "invalid field '\(field)': \(problem)", detail: field)
    }

    private func value(_ key: String) -> JSONValue? {
        guard let v = fields[key], v != .null else { return nil }
        return v
    }

    public func bool(_ key: String) throws(DecodeFailure) -> Bool? {
        guard let v = value(key) else { return nil }
        guard let b = v.boolValue else { throw Self.invalid(key, "expected a boolean, got \(v.typeName)") }
        return b
    }

    public func string(_ key: String, maxLength: Int = 4096) throws(DecodeFailure) -> String? {
        guard let v = value(key) else { return nil }
        guard let s = v.stringValue else { throw Self.invalid(key, "expected a string, got \(v.typeName)") }
        guard s.utf8.count <= maxLength else {
            throw Self.invalid(key, "longer than \(maxLength) bytes")
        }
        guard !s.utf8.contains(0) else { throw Self.invalid(key, "contains a NUL byte") }
        return s
    }

    public func double(_ key: String, min: Double, max: Double = 1e12) throws(DecodeFailure) -> Double? {
        guard let v = value(key) else { return nil }
        guard let n = v.doubleValue else { throw Self.invalid(key, "expected a number, got \(v.typeName)") }
        guard n.isFinite else { throw Self.invalid(key, "must be a finite number, got \(n)") }
        guard n >= min, n <= max else {
            throw Self.invalid(key, "must be in [\(JSONValue.format(min)), \(JSONValue.format(max))], got \(JSONValue.format(n))")
        }
        return n
    }

    public func int(_ key: String, min: Int, max: Int) throws(DecodeFailure) -> Int? {
        guard let v = value(key) else { return nil }
        guard let n = v.intValue else {
            throw Self.invalid(key, "expected an integer, got \(v.doubleValue.map { JSONValue.format($0) } ?? v.typeName)")
        }
        guard n >= min, n <= max else {
            throw Self.invalid(key, "must be in [\(min), \(max)], got \(n)")
        }
        return n
    }

    public func doubles(_ key: String, min: Double, maxCount: Int) throws(DecodeFailure) -> [Double]? {
        guard let v = value(key) else { return nil }
        guard let items = v.arrayValue else {
            throw Self.invalid(key, "expected an array of numbers, got \(v.typeName)")
        }
        guard items.count <= maxCount else { throw Self.invalid(key, "more than \(maxCount) entries") }
        var out: [Double] = []
        out.reserveCapacity(items.count)
        for (i, item) in items.enumerated() {
            guard let n = item.doubleValue, n.isFinite, n >= min else {
                throw Self.invalid(key, "entry \(i) must be a number ≥ \(JSONValue.format(min))")
            }
            out.append(n)
        }
        return out
    }
}
