import CFFmpeg
import Dispatch
import Shared
import Synchronization

/// A dense selection on an idle pool (one caller): the decoding thread hands each wanted frame
/// (a new reference to it) to this stage, whose own thread converts it and delivers it into the
/// block (the checksum, the write into shared memory) while decoding goes on. Those steps are a
/// quarter of a 320x240 frame's work and more of a 720p one's; FFmpeg's frame threads leave
/// them on the decoding thread.
///
/// Frames are converted and delivered one at a time, in the order they were handed over, so the
/// block is the one the decoding thread alone writes: same frames, same bytes. The stage holds at
/// most `depth` frames, waiting or being converted (4, fewer past 64 MiB of decoded frames: one at
/// 8K); the decoding thread waits for room beyond that. A failure of the stage (the conversion, the
/// block) reaches the decoding thread at its next hand-over or at `finish`, and the frames still
/// waiting are then dropped unconverted.
final class ConversionStage: @unchecked Sendable {
    /// Converts and delivers one frame (on the stage's thread).
    typealias Work = (_ index: Int, _ frame: Frame, _ corrupt: Bool) throws(DecodeFailure) -> Void

    /// Frames handed over and not yet delivered, at most: enough to ride out a slow frame on
    /// either side, few enough that the decoder's frame pool grows by only that many.
    static let maxDepth = 4
    /// Decoded frames in the stage take about this much memory at most beyond the decoder's own
    /// (a 4K 4:2:0 frame is ~12 MB, an 8K one ~50 MB): the stage adds little to what a clip
    /// needs on one thread, under the worker's memory limit.
    static let maxHeldBytes = 64 << 20

    /// Frames the stage may hold when a decoded frame takes `frameBytes` bytes, from 1 to
    /// `maxDepth`.
    static func depth(frameBytes: Int) -> Int {
        max(1, min(maxDepth, maxHeldBytes / max(frameBytes, 1)))
    }

    /// The bytes of one decoded `width` x `height` frame in `format`
    /// (`av_image_get_buffer_size`); 8 bytes a pixel, the most any format takes, when the
    /// format is not known yet.
    static func frameBytes(width: Int, height: Int, format: AVPixelFormat) -> Int {
        let w = max(width, 1), h = max(height, 1)
        let size = av_image_get_buffer_size(format, Int32(clamping: w), Int32(clamping: h), 1)
        return size > 0 ? Int(size) : w * h * 8
    }

    /// Frames the stage holds at most, waiting or being converted.
    let depth: Int
    private let queue = DispatchQueue(label: "clipvisor.conversion")
    private let room: DispatchSemaphore
    /// Only under `state`'s lock; `work` runs on the stage's one thread.
    private struct State: @unchecked Sendable {
        /// Until `finish` or `abandon`, which let go of it.
        var work: Work?
        /// The first failure of `work`.
        var failure: DecodeFailure?
        /// The decoding thread gave up: nothing more is delivered.
        var abandoned = false
    }

    private let state: Mutex<State>

    /// `work` may use what the caller's scope owns (a closure made escaping with
    /// `withoutActuallyEscaping`): `finish` and `abandon` return only when no frame is being
    /// converted any more, and drop `work` before they do, even if the stage itself lives on a
    /// moment in the queue's last block.
    init(depth: Int = maxDepth, work: @escaping Work) {
        precondition(depth >= 1)
        self.depth = depth
        room = DispatchSemaphore(value: depth)
        state = Mutex(State(work: work))
    }

    /// Hands a wanted frame over (`frame` must be a reference of its own, see
    /// `Frame.reference`); throws the stage's failure, if it had one, instead.
    func submit(_ index: Int, _ frame: Frame, corrupt: Bool) throws(DecodeFailure) {
        if let failed = state.withLock({ $0.failure }) { throw failed }
        room.wait()
        let item = HandedFrame(frame)
        queue.async { [self] in
            defer { room.signal() }
            defer { item.frame = nil }  // released before its room is given back
            let work = state.withLock { $0.failure == nil && !$0.abandoned ? $0.work : nil }
            guard let work, let frame = item.frame else { return }
            do throws(DecodeFailure) {
                try work(index, frame, corrupt)
            } catch {
                state.withLock { if $0.failure == nil { $0.failure = error } }
            }
        }
    }

    /// Waits until every frame handed over is delivered; throws the stage's failure, if any.
    func finish() throws(DecodeFailure) {
        queue.sync {}
        if let failed = state.withLock({ state in state.work = nil; return state.failure }) { throw failed }
    }

    /// Drops the frames still waiting and waits for the one being converted (the decoding
    /// thread failed: nothing more will be delivered).
    func abandon() {
        state.withLock { $0.abandoned = true }
        queue.sync {}
        state.withLock { $0.work = nil }
    }

    /// A frame crossing to the stage's thread: the decoding thread no longer touches it.
    private final class HandedFrame: @unchecked Sendable {
        var frame: Frame?
        init(_ frame: Frame) { self.frame = frame }
    }
}
