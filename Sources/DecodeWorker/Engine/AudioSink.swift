import Shared

/// The output audio on the clip's sample grid: sample index i is at time i / rate seconds from
/// the time origin (docs/decoding.md, "Audio"). Keeps the samples of `[first, last)` in one
/// growing buffer per channel; what arrives before `first` or at/after `last` is dropped, a hole
/// before a later sample is filled with silence, and a sample for an index already written is
/// dropped (the earlier audio wins).
final class AudioSink {
    /// First grid index of the output.
    let first: Int
    /// End grid index (exclusive); nil while the end is that of the stream.
    private(set) var last: Int?
    let channels: Int
    let rate: Int
    /// Bytes the output may take (`max_output_bytes` less what the video took).
    let byteBudget: Int
    let path: String
    private(set) var planes: [[Float]]
    /// Grid index of the next sample a resampler run will append.
    private var next = 0
    /// Samples of silence written where no audio was (before the first sample, in holes between
    /// resampler runs), and samples dropped because their index was already written.
    private(set) var paddedSamples = 0
    private(set) var droppedSamples = 0
    /// Grid index of the first sample that came from the stream, if any did.
    private(set) var firstAudioIndex: Int?

    /// `expectedSamples` (per channel) sizes the planes when the range is open-ended.
    init(first: Int, last: Int?, channels: Int, rate: Int, byteBudget: Int, path: String, expectedSamples: Int? = nil) {
        self.first = first
        self.last = last
        self.channels = channels
        self.rate = rate
        self.byteBudget = byteBudget
        self.path = path
        planes = Array(repeating: [], count: channels)
        // A claimed length may be wrong either way: a little headroom, never past the budget.
        let reserved = last.map { $0 - first } ?? expectedSamples.map { $0 + $0 / 32 + rate }
        if let reserved, reserved > 0 {
            let capacity = min(reserved, byteBudget / max(1, channels * 4))
            for c in 0..<channels { planes[c].reserveCapacity(capacity) }
        }
    }

    /// Samples per channel held.
    var count: Int { planes.first?.count ?? 0 }
    /// Grid index after the last sample held.
    var end: Int { first + count }
    /// Whether the range is complete: no later sample can be kept.
    var isFull: Bool { last.map { end >= $0 } ?? false }

    /// The next appended samples start at grid index `index` (a new resampler run).
    func begin(at index: Int) { next = index }

    /// Appends `count` contiguous samples (one buffer per channel) at the current position.
    func append(_ source: (Int) -> UnsafeBufferPointer<Float>, count: Int) throws(DecodeFailure) {
        guard count > 0 else { return }
        var lo = next
        var offset = 0
        next += count
        let hi = last.map { min(next, $0) } ?? next
        // Before the range, or already written: dropped.
        let skipTo = max(first, end)
        if lo < skipTo {
            let skip = min(count, skipTo - lo)
            let overlapping = max(0, min(lo + skip, end) - max(lo, first))
            droppedSamples += overlapping
            offset += skip
            lo += skip
        }
        guard lo < hi else { return }
        if lo > end { try pad(to: lo) }
        if firstAudioIndex == nil { firstAudioIndex = lo }
        let n = hi - lo
        try reserve(n)
        for c in 0..<channels {
            let buffer = source(c)
            planes[c].append(contentsOf: UnsafeBufferPointer(rebasing: buffer[offset..<(offset + n)]))
        }
    }

    /// Silence up to grid index `index` (exclusive), bounded by the range.
    func pad(to index: Int) throws(DecodeFailure) {
        let target = last.map { min(index, $0) } ?? index
        guard target > end else { return }
        let n = target - end
        try reserve(n)
        for c in 0..<channels { planes[c].append(contentsOf: repeatElement(0, count: n)) }
        paddedSamples += n
    }

    /// Drops samples past grid index `index` (encoder padding the container trims).
    func truncate(to index: Int) {
        let keep = max(0, index - first)
        let excess = count - keep
        guard excess > 0 else { return }
        for c in 0..<channels { planes[c].removeLast(excess) }
    }

    /// Sets samples that are not finite or beyond ±`AudioSink.sampleLimit` to 0 and returns how
    /// many there were: a decoder that produces such values (MPEG-4 ALS float in FFmpeg 5.1 gives
    /// ±1e38 and NaN) is producing garbage, which must not pass for audio.
    func sanitize() -> Int {
        var bad = 0
        for c in 0..<channels {
            planes[c].withUnsafeMutableBufferPointer { samples in
                for i in samples.indices {
                    let x = samples[i]
                    if !(abs(x) <= Self.sampleLimit) {
                        samples[i] = 0
                        bad += 1
                    }
                }
            }
        }
        return bad
    }

    /// Float audio is nominally within ±1; a value beyond this (60 dB over full scale) is damage.
    static let sampleLimit: Float = 1000

    /// Ends an open range where the samples end.
    func close() { if last == nil { last = end } }

    private func reserve(_ more: Int) throws(DecodeFailure) {
        let bytes = (count + more) * channels * 4
        if bytes > byteBudget {
            throw DecodeFailure(
                .tooLarge,
                "\(path): the audio output passed \(byteBudget) bytes (\(count + more) samples × \(channels) channels of float32) while decoding, above the limit",
                path: path, detail: "max_output_bytes")
        }
    }
}
