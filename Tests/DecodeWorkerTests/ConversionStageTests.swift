import CFFmpeg
import Foundation
import Shared
import Synchronization
import Testing

@testable import DecodeWorker

/// A dense selection given idle slots converts and writes its frames on a thread of their own
/// (ConversionStage): the block must be the one a single thread writes, damaged media included,
/// and a failure on the stage's thread must stop the clip with that failure.
@Suite(.serialized) struct ConversionStageTests {
    /// 20 s of 320x240 at 30 fps, a keyframe every 30 frames, B-frames (EngineTests' fixture).
    var clip: String { get throws { try EngineTests.fixture.get() } }

    @Test func theStageGivesTheFramesOfOneThread() throws {
        var options = DecodeOptions()
        options.selection = .rate(fps: 30)
        options.maxFrames = 768
        let (one, oneBytes) = try Support.decode(clip, options)
        #expect(one.video?.conversionThread == false)
        #expect(one.video?.decoderThreads == 1)
        for budget in [2, 3] {
            let (staged, stagedBytes) = try Support.decode(clip, options, threadBudget: budget)
            let video = try #require(staged.video)
            #expect(video.conversionThread == true, "budget \(budget): \(video)")
            #expect(video.decoderThreads == budget - 1, "the stage takes one of the \(budget) slots")
            #expect(video.readers == 1)
            #expect(video.shape == one.video?.shape)
            #expect(video.indices == one.video?.indices)
            #expect(video.pts == one.video?.pts)
            #expect(stagedBytes == oneBytes, "budget \(budget): other bytes than one thread's")
        }
    }

    /// A sparse selection keeps parallel readers; the stage is for dense ones only.
    @Test func aSparseSelectionGetsNoStage() throws {
        var options = DecodeOptions()
        options.selection = .rate(fps: 2)
        let (result, _) = try Support.decode(clip, options, threadBudget: 2)
        #expect(result.video?.conversionThread == false)
        #expect(result.video?.readers == 2)
    }

    /// A damaged stream (one frame's NAL units cut) decodes to the same partial result: the
    /// same frames, the same report of the one that did not decode.
    @Test func damagedMediaGivesTheSamePartialResult() throws {
        try #require(Support.hasCorpus)
        var all = DecodeOptions()
        all.selection = .count(50)
        all.frameFactor = 1
        let path = Support.corpusFile("decord__corrupted.mp4")
        let (one, oneBytes) = try Support.decode(path, all)
        let (staged, stagedBytes) = try Support.decode(path, all, threadBudget: 2)
        #expect(staged.video?.conversionThread == true)
        #expect(one.partial && staged.partial)
        #expect(staged.partialDetail == one.partialDetail)
        #expect(staged.video?.indices == one.video?.indices)
        #expect(staged.video?.shape[0] == 49)
        #expect(stagedBytes == oneBytes)
    }

    /// The stage delivers in the order frames were handed over; a failure stops it at once (the
    /// frames waiting are dropped, every frame handed over is released) and reaches the decoding
    /// thread at its next hand-over or at `finish`.
    @Test func aFailureOnTheStageStopsTheClip() throws {
        let delivered = Mutex<[Int]>([])
        let failing = 5
        let stage = ConversionStage { index, _, _ throws(DecodeFailure) in
            if index == failing { throw DecodeFailure(.decodeError, "clip.mp4: cannot write the block: disk full", path: "clip.mp4") }
            usleep(2000)  // slower than the hand-overs, so frames wait behind the failing one
            delivered.withLock { $0.append(index) }
        }
        var handed: [WeakFrame] = []
        var thrownAtSubmit: DecodeFailure?
        for index in 0..<40 {
            let frame = try Frame()
            do throws(DecodeFailure) {
                try stage.submit(index, frame, corrupt: false)
            } catch {
                thrownAtSubmit = error
                break
            }
            handed.append(WeakFrame(frame))
        }
        var thrownAtFinish: DecodeFailure?
        do throws(DecodeFailure) { try stage.finish() } catch { thrownAtFinish = error }
        let failure = try #require(thrownAtSubmit ?? thrownAtFinish)
        #expect(failure.message.contains("disk full"))
        #expect(delivered.withLock { $0 } == Array(0..<failing), "frames after the failure were delivered, or out of order")
        #expect(handed.count > failing + 1, "no frame waited behind the failing one")
        #expect(handed.allSatisfy { $0.frame == nil }, "a frame handed over was never released")
    }

    /// The stage holds no more than `depth` frames (waiting or being converted): the decoding
    /// thread waits for room beyond that, and big frames get fewer places.
    @Test func framesHeldAreBounded() throws {
        let frame320 = ConversionStage.frameBytes(width: 320, height: 240, format: AV_PIX_FMT_YUV420P)
        #expect(frame320 == 320 * 240 * 3 / 2)
        #expect(ConversionStage.depth(frameBytes: frame320) == ConversionStage.maxDepth)
        let frame4K = ConversionStage.frameBytes(width: 3840, height: 2160, format: AV_PIX_FMT_YUV420P)
        #expect(ConversionStage.depth(frameBytes: frame4K) == 4)
        let frame4K444 = ConversionStage.frameBytes(width: 3840, height: 2160, format: AV_PIX_FMT_YUV444P16LE)
        #expect(ConversionStage.depth(frameBytes: frame4K444) == 1)
        let unknown = ConversionStage.frameBytes(width: 3840, height: 2160, format: AV_PIX_FMT_NONE)
        #expect(unknown == 3840 * 2160 * 8)
        let finished = Atomic<Int>(0)
        let stage = ConversionStage(depth: 2) { _, _, _ throws(DecodeFailure) in
            usleep(5000)
            finished.add(1, ordering: .sequentiallyConsistent)
        }
        var mostHeld = 0
        for index in 0..<12 {
            try stage.submit(index, try Frame(), corrupt: false)
            mostHeld = max(mostHeld, index + 1 - finished.load(ordering: .sequentiallyConsistent))
        }
        try stage.finish()
        #expect(finished.load(ordering: .sequentiallyConsistent) == 12)
        #expect(mostHeld <= 2, "\(mostHeld) frames held at once with depth 2")
    }

    /// `abandon` (the decoding thread failed) returns only once the frame being converted is
    /// done, and drops the frames waiting.
    @Test func abandonWaitsForTheFrameBeingConverted() throws {
        let started = Atomic<Int>(0)
        let delivered = Atomic<Int>(0)
        let stage = ConversionStage { _, _, _ throws(DecodeFailure) in
            started.add(1, ordering: .sequentiallyConsistent)
            usleep(20_000)
            delivered.add(1, ordering: .sequentiallyConsistent)
        }
        for index in 0..<ConversionStage.maxDepth {
            try stage.submit(index, try Frame(), corrupt: false)
        }
        while started.load(ordering: .sequentiallyConsistent) == 0 { usleep(100) }
        stage.abandon()
        #expect(delivered.load(ordering: .sequentiallyConsistent) == 1, "abandon returned while a frame was converted")
        usleep(50_000)
        #expect(started.load(ordering: .sequentiallyConsistent) == 1, "frames waiting were converted after abandon")
    }

    /// `decodeLoop`'s shape: a `work` made escaping with `withoutActuallyEscaping` must be let go
    /// by `finish` or `abandon` on every path, else the runtime traps (and this test process
    /// dies); every failure, the stage's (early, or at the last frame, seen only by `finish`) or
    /// the decoding thread's, comes out.
    @Test func workIsLetGoOnEveryPath() throws {
        func run(failAt: Int?, decodingThrowsAt: Int?) -> (delivered: [Int], failure: DecodeFailure?) {
            var delivered: [Int] = []
            let store: (Int) throws(DecodeFailure) -> Void = { index throws(DecodeFailure) in
                if index == failAt { throw DecodeFailure(.decodeError, "x.mp4: the stage failed", path: "x.mp4") }
                usleep(1000)
                delivered.append(index)
            }
            let outcome = withoutActuallyEscaping(store) { store in
                Result { () throws(DecodeFailure) -> Void in
                    let stage = ConversionStage(depth: 3) { index, _, _ throws(DecodeFailure) in try store(index) }
                    do throws(DecodeFailure) {
                        for index in 0..<20 {
                            if index == decodingThrowsAt { throw DecodeFailure(.outOfMemory, "x.mp4: ENOMEM", path: "x.mp4") }
                            try stage.submit(index, try Frame(), corrupt: false)
                        }
                        try stage.finish()
                    } catch {
                        stage.abandon()
                        throw error
                    }
                }
            }
            if case .failure(let failure) = outcome { return (delivered, failure) }
            return (delivered, nil)
        }
        let clean = run(failAt: nil, decodingThrowsAt: nil)
        #expect(clean.failure == nil && clean.delivered == Array(0..<20))
        #expect(run(failAt: 4, decodingThrowsAt: nil).failure?.message.contains("the stage failed") == true)
        let atTheEnd = run(failAt: 19, decodingThrowsAt: nil)
        #expect(atTheEnd.failure?.message.contains("the stage failed") == true, "a failure only finish sees was lost")
        #expect(atTheEnd.delivered == Array(0..<19))
        let decoding = run(failAt: nil, decodingThrowsAt: 7)
        #expect(decoding.failure?.message.contains("ENOMEM") == true)
        #expect(decoding.delivered.count <= 7)
    }

    final class WeakFrame {
        weak var frame: Frame?
        init(_ frame: Frame) { self.frame = frame }
    }
}
