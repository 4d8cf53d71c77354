import CFFmpeg
import Foundation
import Shared
import Testing

@testable import DecodeWorker

/// A sparse selection given idle slots is decoded by several readers at once, each from its
/// own keyframe (ParallelFrameReading): the frames must be exactly those of one reader.
@Suite(.serialized) struct ParallelReadingTests {
    /// 20 s at 30 fps, a keyframe every 30 frames, B-frames (EngineTests' fixture).
    var clip: String { get throws { try EngineTests.fixture.get() } }

    @Test(arguments: [(0.5, AccessPolicy.auto), (2.0, .auto), (2.0, .seek), (7.0, .auto)])
    func parallelReadersGiveTheFramesOfOne(fps: Double, access: AccessPolicy) throws {
        var options = DecodeOptions()
        options.selection = .rate(fps: fps)
        let (one, oneBytes) = try Support.decode(clip, options, access: access)
        #expect(one.video?.readers == 1)
        for budget in [2, 3] {
            let (many, manyBytes) = try Support.decode(clip, options, access: access, threadBudget: budget)
            let video = try #require(many.video)
            #expect(video.readers == budget, "fps \(fps), budget \(budget): \(video.readers ?? 0) readers")
            #expect(video.decoderThreads == 1, "a sparse selection gets readers, not frame threads")
            #expect(video.indices == one.video?.indices)
            #expect(video.pts == one.video?.pts)
            #expect(manyBytes == oneBytes, "fps \(fps), budget \(budget): other bytes than one reader's")
        }
    }

    @Test func groupsStartAtKeyframesAfterThePreviousGroupAndCoverEveryFrame() throws {
        let path = try clip
        // Under the engine lock: FFmpeg's log is process-global (see Support.withEngine).
        let table = try Support.withEngine { () throws -> FrameTable in
            let demuxer = try Demuxer(path: path, displayPath: path, maxPixels: 1 << 26)
            let stream = try #require(demuxer.bestStream(AVMEDIA_TYPE_VIDEO))
            return try FrameTable.scan(demuxer, streamIndex: stream)
        }
        let wanted = Array(stride(from: 3, to: table.count, by: 15))
        let groups = try #require(ParallelFrameReading.groups(wanted, table: table, policy: .auto, parts: 4))
        #expect(groups.count == 4)
        #expect(groups.flatMap { $0 } == wanted)
        for (previous, group) in zip(groups, groups.dropFirst()) {
            let reached = previous.map { table.presented[$0] }.max()!
            let sync = try #require(table.syncPoint(for: group[0]))
            #expect(sync > reached, "a group starts at keyframe \(sync), inside the previous group (up to \(reached))")
        }
        let work = groups.map { g in g.map { table.presented[$0] }.max()! - (table.syncPoint(for: g[0]) ?? 0) + 1 }
        #expect(work.max()! <= 2 * work.min()!, "unbalanced groups: \(work)")
        // Nothing to share out: one wanted frame, a sequential policy, or one budget.
        #expect(ParallelFrameReading.groups([10], table: table, policy: .auto, parts: 4) == nil)
        #expect(ParallelFrameReading.groups(wanted, table: table, policy: .sequential, parts: 4) == nil)
        #expect(ParallelFrameReading.groups(wanted, table: table, policy: .auto, parts: 1) == nil)
    }

    /// A dense selection gets a conversion thread and frame threads instead (ConversionStageTests).
    @Test func aDenseSelectionGetsNoReaders() throws {
        var options = DecodeOptions()
        options.selection = .rate(fps: 30)
        options.maxFrames = 768
        let (result, _) = try Support.decode(clip, options, threadBudget: 2)
        #expect(result.video?.readers == 1)
        #expect(result.video?.conversionThread == true)
    }
}
