import Dispatch
import Shared
import Synchronization

/// One caller on an idle pool with a sparse selection (2 fps from 30, 0.25 fps over minutes):
/// frame threads do not help there — they decode frames that skipping would drop — so the idle
/// slots the supervisor lent (`WorkerJob.threadBudget`) go to whole readers instead. The wanted
/// frames are shared out, contiguously, among up to that many readers, cut where a frame's
/// keyframe lies past every frame before it; each reader has its own demuxer, decoder and
/// converter on its own thread and plans its own seeks (`VideoFrameReader.run`). Frames meet in
/// the one `FrameSink`, which writes them in order, so the block is the one a single reader
/// makes: same frames, same bytes.
enum ParallelFrameReading {
    /// Output above this is not decoded in parallel: frames of later groups wait in memory until
    /// the earlier ones are written.
    static let maxHeldBytes = 512 << 20

    /// The wanted frames (ascending presentation indices) in at most `parts` contiguous groups
    /// of about equal decoding work, each starting at a keyframe after the previous group's last
    /// frame (so no frame is decoded twice); nil when there cannot be two. A group's work is the
    /// frames from its first keyframe to its last wanted frame, in decoding order.
    static func groups(_ wanted: [Int], table: FrameTable, policy: AccessPolicy, parts: Int) -> [[Int]]? {
        guard parts > 1, wanted.count > 1, policy != .sequential, table.timed, table.packetByKey != nil else { return nil }
        let ordinals = wanted.map { table.presented[$0] }
        let syncs = wanted.map { table.syncPoint(for: $0) }
        // Where a new reader may start: frame k's keyframe lies after everything before k.
        var starts: [Int] = [0]
        var reached = ordinals[0]
        for k in 1..<wanted.count {
            if let sync = syncs[k], sync > reached { starts.append(k) }
            reached = max(reached, ordinals[k])
        }
        guard starts.count > 1 else { return nil }
        func work(_ range: Range<Int>) -> Int {
            (ordinals[range].max() ?? 0) - (syncs[range.lowerBound] ?? 0) + 1
        }
        let share = Double(work(0..<wanted.count)) / Double(min(parts, starts.count))
        var cuts: [Int] = []
        var groupStart = 0
        for start in starts.dropFirst() where cuts.count < parts - 1 {
            // Cut here when the group so far has reached about its share of the work.
            if Double(work(groupStart..<start)) >= share * 0.9 {
                cuts.append(start)
                groupStart = start
            }
        }
        guard !cuts.isEmpty else { return nil }
        let bounds = [0] + cuts + [wanted.count]
        return (0..<(bounds.count - 1)).map { Array(wanted[bounds[$0]..<bounds[$0 + 1]]) }
    }

    /// Runs one reader per group at once (`makeReader(i)` builds group i's, on its thread) and
    /// merges their outcomes; the first failure, in group order, is the clip's.
    static func run(
        groups: [[Int]], policy: AccessPolicy, sink: FrameSink,
        makeReader: (Int) throws(DecodeFailure) -> VideoFrameReader
    ) throws(DecodeFailure) -> VideoFrameReader.Outcome {
        let shared = Shared(sink: sink, count: groups.count)
        withoutActuallyEscaping(makeReader) { makeReader in
            let builder = UncheckedBox(makeReader)
            DispatchQueue.concurrentPerform(iterations: groups.count) { index in
                let result = Result { () throws(DecodeFailure) -> VideoFrameReader.Outcome in
                    let reader = try builder.value(index)
                    return try reader.run(wanted: groups[index], policy: policy) { frameIndex, bytes, _ throws(DecodeFailure) in
                        try shared.deliver(frameIndex, bytes)
                    }
                }
                shared.store(result, at: index)
            }
        }
        var merged = VideoFrameReader.Outcome()
        for result in shared.results {
            let outcome = try result!.get()
            merged.usedSeek = merged.usedSeek || outcome.usedSeek
            merged.missing += outcome.missing
            merged.errors += outcome.errors.filter { !merged.errors.contains($0) }
            merged.corruptFrames += outcome.corruptFrames
            merged.readError = merged.readError ?? outcome.readError
            merged.notes += outcome.notes.filter { !merged.notes.contains($0) }
        }
        merged.missing.sort()
        return merged
    }

    /// What the readers' threads share: the sink and their results, behind one lock.
    private final class Shared: @unchecked Sendable {
        private let lock = Mutex<Void>(())
        private let sink: FrameSink
        private(set) var results: [Result<VideoFrameReader.Outcome, DecodeFailure>?]

        init(sink: FrameSink, count: Int) {
            self.sink = sink
            results = Array(repeating: nil, count: count)
        }

        func deliver(_ index: Int, _ bytes: [UInt8]) throws(DecodeFailure) {
            try lock.withLock { (_: inout Void) throws(DecodeFailure) in try sink.deliver(index, bytes) }
        }

        func store(_ result: Result<VideoFrameReader.Outcome, DecodeFailure>, at index: Int) {
            lock.withLock { _ in results[index] = result }
        }
    }

    /// Hands a non-Sendable value to the readers' threads; each uses it for its own group only.
    private struct UncheckedBox<Value>: @unchecked Sendable {
        let value: Value
        init(_ value: Value) { self.value = value }
    }
}
