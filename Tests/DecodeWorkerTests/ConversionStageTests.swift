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
    /// frames waiting are dropped, every frame is released) and reaches the decoding thread at
    /// its next hand-over or at `finish`.
    @Test func aFailureOnTheStageStopsTheClip() throws {
        let delivered = Mutex<[Int]>([])
        let failing = 5
        let stage = ConversionStage { index, _, _ throws(DecodeFailure) in
            if index == failing { throw DecodeFailure(.decodeError, "clip.mp4: cannot write the block: disk full", path: "clip.mp4") }
            usleep(2000)  // slower than the hand-overs, so frames wait behind the failing one
            delivered.withLock { $0.append(index) }
        }
        weak var lastFrame: Frame?
        var thrownAtSubmit: DecodeFailure?
        for index in 0..<40 {
            let frame = try Frame()
            lastFrame = frame
            do throws(DecodeFailure) {
                try stage.submit(index, frame, corrupt: false)
            } catch {
                thrownAtSubmit = error
                break
            }
        }
        var thrownAtFinish: DecodeFailure?
        do throws(DecodeFailure) { try stage.finish() } catch { thrownAtFinish = error }
        let failure = try #require(thrownAtSubmit ?? thrownAtFinish)
        #expect(failure.message.contains("disk full"))
        #expect(delivered.withLock { $0 } == Array(0..<failing), "frames after the failure were delivered, or out of order")
        #expect(lastFrame == nil, "a frame handed over was never released")
    }

    /// The stage holds no more than `depth` frames (waiting or being converted): the decoding
    /// thread waits for room beyond that, and big frames get fewer places (their memory counts
    /// against the worker's limit).
    @Test func framesWaitingAreBounded() throws {
        #expect(ConversionStage.depth(width: 320, height: 240) == ConversionStage.maxDepth)
        #expect(ConversionStage.depth(width: 3840, height: 2160) == 2)
        #expect(ConversionStage.depth(width: 7680, height: 4320) == 1)
        #expect(ConversionStage.depth(width: 0, height: 0) == ConversionStage.maxDepth)
        let started = Atomic<Int>(0)
        let stage = ConversionStage(depth: 2) { _, _, _ throws(DecodeFailure) in
            started.add(1, ordering: .relaxed)
            usleep(5000)
        }
        var mostWaiting = 0
        for index in 0..<12 {
            try stage.submit(index, try Frame(), corrupt: false)
            // Handed over and not yet started: never more than the stage holds.
            mostWaiting = max(mostWaiting, index + 1 - started.load(ordering: .relaxed))
        }
        try stage.finish()
        #expect(started.load(ordering: .relaxed) == 12)
        #expect(mostWaiting <= 2, "\(mostWaiting) frames were handed over and not yet started")
    }

    /// `abandon` (the decoding thread failed) drops what waits and returns once nothing runs.
    @Test func abandoningDropsTheWaitingFrames() throws {
        let delivered = Atomic<Int>(0)
        let stage = ConversionStage { _, _, _ throws(DecodeFailure) in
            usleep(20_000)
            delivered.add(1, ordering: .relaxed)
        }
        for index in 0..<ConversionStage.maxDepth {
            try stage.submit(index, try Frame(), corrupt: false)
        }
        stage.abandon()
        let done = delivered.load(ordering: .relaxed)
        #expect(done < ConversionStage.maxDepth, "abandon waited for every waiting frame")
        usleep(50_000)
        #expect(delivered.load(ordering: .relaxed) == done, "the stage went on after abandon returned")
    }
}
