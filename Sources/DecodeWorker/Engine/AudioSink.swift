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

    init(first: Int, last: Int?, channels: Int, rate: Int, byteBudget: Int, path: String) {
        self.first = first
        self.last = last
        self.channels = channels
        self.rate = rate
        self.byteBudget = byteBudget
        self.path = path
        planes = Array(repeating: [], count: channels)
        if let last, last > first, (last - first) * channels * 4 <= byteBudget {
            for c in 0..<channels { planes[c].reserveCapacity(last - first) }
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
        guard keep < count else { return }
        for c in 0..<channels { planes[c].removeLast(count - keep) }
    }

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
