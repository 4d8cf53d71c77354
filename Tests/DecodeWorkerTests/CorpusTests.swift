import Foundation
import Shared
import Testing

@testable import DecodeWorker

/// Every file of ../shared/corpus/real with a video stream: clean ones decode with the right
/// counts and times; broken ones give a clean error or an honest `partial`, in a subprocess so a
/// crash or hang cannot take the test runner down.
@Suite(.serialized, .timeLimit(.minutes(10)))
struct CorpusTests {
    static let rows = Support.manifest().filter { ($0["WxH"] ?? "-") != "-" }

    /// Clean files that must not come out as a plain success, and why.
    static let cleanExceptions: [String: SkipReason] = [
        // Encrypted (ClearKey CBCS): ffmpeg "decodes" garbage without the key; we refuse.
        "mp4parse-rust__av1-clearkey-cbcs-video.mp4": .unsupported,
        // ASF whose video stream holds no frame at all (ffmpeg decodes 0 frames).
        "mathiasbynens-small__WindowsMediaVideo.wmv": .decodeError,
    ]

    /// Clean files whose decoder flags concealed frames or missing ones without logging errors.
    static let cleanButPartial: Set<String> = ["openh264__Error_I_P.264"]

    static func options(frames: Int) -> DecodeOptions {
        var o = DecodeOptions()
        o.level = 1
        if frames < 4 {
            o.selection = .count(1)
            o.frameFactor = 1
        }
        return o
    }

    @Test func cleanFilesDecode() throws {
        try #require(Support.hasCorpus)
        var checked = 0
        for row in Self.rows where row["decodes_cleanly"] == "yes" {
            let name = row["file"]!
            let path = Support.corpusFile(name)
            let decoded = Int(row["decoded_frames"] ?? "") ?? 0
            // Probe works on every clean file.
            let probe = try Support.probe(path)
            #expect(probe["video_stream"] != .null, "\(name): probe finds the video stream")
            do {
                let (result, bytes) = try Support.decode(path, Self.options(frames: decoded))
                #expect(Self.cleanExceptions[name] == nil, "\(name) should have failed")
                let video = try #require(result.video)
                #expect(bytes.count == video.shape.reduce(1, *), "\(name): tensor bytes match the shape")
                #expect(result.partial == Self.cleanButPartial.contains(name), "\(name): partial \(result.partialDetail ?? "")")
                // The manifest counts the first video stream; with several, the best one is decoded.
                if decoded > 0, !(row["WxH"] ?? "").contains(";") {
                    #expect(result.source.frameCount == decoded, "\(name): \(result.source.frameCount ?? -1) frames vs ffmpeg's \(decoded)")
                }
                #expect(video.pts.first.map { $0 >= 0 } ?? false)
                #expect(video.indices == video.indices.sorted())
                checked += 1
            } catch let error as DecodeFailure {
                #expect(Self.cleanExceptions[name] == error.reason, "\(name): \(error)")
            }
        }
        #expect(checked >= 60)
    }

    @Test func brokenFilesFailCleanly() throws {
        try #require(Support.hasCorpus)
        var count = 0
        for row in Self.rows where row["decodes_cleanly"] != "yes" {
            let name = row["file"]!
            let r = try Support.run([Support.worker, "decode", Support.corpusFile(name), "--level", "1"], timeout: 120)
            #expect(!r.timedOut, "\(name) hung")
            #expect(r.signal == nil, "\(name) crashed with signal \(r.signal ?? 0)")
            #expect(r.status == 0 || r.status == 1, "\(name): exit \(r.status)")
            let json = try JSONValue.parse(Array(r.stdout.utf8))
            if r.status == 1 {
                let failure = try #require(DecodeFailure(json: json), "\(name): error object")
                #expect(failure.message.contains(name), "\(name): message names the file")
            } else {
                let result = try JSONCoding.decode(DecodeResult.self, from: json)
                if row["decodes_cleanly"] == "no" {
                    #expect(result.partial, "\(name): damaged file returned as a clean success")
                    #expect(result.partialDetail?.isEmpty == false)
                }
            }
            count += 1
        }
        #expect(count >= 20)
    }

    /// Container counts that disagree with what decodes are reported, never silent.
    @Test func countDisagreementsAreReported() throws {
        try #require(Support.hasCorpus)
        let (hf, _) = try Support.decode(Support.corpusFile("hf-datasets__test_video_66x50.mov"))
        #expect(hf.source.frameCount == 82)
        #expect(hf.warnings.contains { $0.contains("87") && $0.contains("82") })
        let (avi, _) = try Support.decode(Support.corpusFile("go-mediainfo__sample.avi"))
        #expect(avi.source.frameCount == 119)
        #expect(avi.warnings.contains { $0.contains("120") })
        var all = DecodeOptions()
        all.selection = .count(50)
        all.frameFactor = 1
        let (bad, bytes) = try Support.decode(Support.corpusFile("decord__corrupted.mp4"), all)
        #expect(bad.partial)
        #expect(bad.video!.shape[0] == 49)
        #expect(bad.partialDetail!.contains("1 of 50"))
        #expect(bytes.count == 49 * 3 * 720 * 1280)
    }

    /// Every frame's time agrees with ffprobe's (sorted presentation times minus the first).
    @Test(arguments: [
        "decord__unordered.mov", "moviepy__fire2.mp4", "jcodec__cat_avc_clip.mp4", "jcodec__cat_key_clip.mp4",
        "hf-datasets__test_video_66x50.mov", "jcodec__precise_clip.mp4", "go-mediainfo__sample.ts",
        "moviepy__no_duration.webm", "torchcodec__nasa_13013.mp4", "go-mediainfo__sample.avi",
    ])
    func timesMatchFFprobe(_ name: String) throws {
        try #require(Support.hasCorpus)
        let path = Support.corpusFile(name)
        let truth = try Support.ffprobeFrameTimes(path)
        var options = DecodeOptions()
        options.selection = .count(truth.count)
        options.frameFactor = 1
        options.width = 16
        options.height = 16
        if name.contains("nasa") { return }  // ffprobe's v:0 is stream 0; the best stream is 3 (checked below)
        let (result, _) = try Support.decode(path, options)
        let video = try #require(result.video)
        #expect(video.indices == Array(0..<truth.count))
        #expect(video.pts.count == truth.count)
        for (ours, theirs) in zip(video.pts, truth) {
            #expect(abs(ours - (theirs - truth[0])) < 1e-4, "\(name): \(ours) vs \(theirs - truth[0])")
        }
    }

    /// torchcodec's own frame list for nasa stream 3 (the best stream): 390 frames and their times.
    @Test func timesMatchTorchcodec() throws {
        try #require(Support.hasCorpus)
        let info = try JSONValue.parse(Array(try Data(contentsOf: URL(fileURLWithPath: Support.corpusFile(
            "reference/torchcodec__nasa_13013.mp4.stream3.all_frames_info.json")))))
        let times = info.arrayValue!.map { Double($0["pts_time"]!.stringValue!)! }
        var options = DecodeOptions()
        options.selection = .count(times.count)
        options.frameFactor = 1
        options.width = 16
        options.height = 16
        let (result, _) = try Support.decode(Support.corpusFile("torchcodec__nasa_13013.mp4"), options)
        #expect(result.video!.pts.count == 390)
        for (ours, theirs) in zip(result.video!.pts, times) { #expect(abs(ours - theirs) < 1e-5) }
    }
}
