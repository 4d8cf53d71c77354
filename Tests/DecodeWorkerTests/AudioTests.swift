import CFFmpeg
import Foundation
import Shared
import Testing

@testable import DecodeWorker

/// Audio and audio-in-video (docs/decoding.md, "Audio"), on the corpus and on generated clips.
///
/// References come from the ffmpeg CLI (`-map 0:INDEX -ar R -ac C -f f32le`), which runs the same
/// libswresample with the same defaults: the measured difference is 0 (bit-identical) on every
/// clean corpus file; the asserted bound is a relative RMS error of 1e-4. "Duration" is the
/// length of that independent decode: ours, counted from the stream's first sample, is within
/// one codec frame of it (MP4 edit lists trim the AAC padding that the CLI leaves in).
@Suite(.serialized, .timeLimit(.minutes(15)))
struct AudioCorpusTests {
    static let rows = Support.manifest().filter { ($0["audio"] ?? "-") != "-" }

    /// Clean files (by the manifest) that must not come out as a plain success, and why.
    static let cleanExceptions: [String: SkipReason] = [
        // A CENC init segment: encrypted, and no samples at all.
        "mp4parse-rust__bipbop-cenc-audioinit.mp4": .unsupported,
        // No audio packets (the ffmpeg CLI decodes 0 samples).
        "mutagen__nero-chapters.m4b": .decodeError,
        // A WAV header with no data.
        "pydub__test1_empty.wav": .decodeError,
        // MPEG-4 ALS float: FFmpeg 5.1 decodes it to ±1e38 and NaN (the CLI too).
        "mp4-rust__extended_audio_object_type.mp4": .decodeError,
    ]

    /// Clean files whose container timestamps hold a gap (seconds): we fill it with silence, so the
    /// reference is made with `aresample=async=1`, which does the same.
    static let timestampGaps: [String: Double] = [
        "imageio-test_images__realshort.mp4": 0.0124, "moviepy__fire2.mp4": 0.1551, "pydub__bach.ogg": 0.0251,
        "pydub__test5.webm": 0.020,
    ]

    static let bound = 1e-4

    @Test(arguments: [(16_000, 1), (44_100, 2)])
    func cleanAudioMatchesFFmpeg(_ rate: Int, _ channels: Int) throws {
        try #require(Support.hasCorpus)
        var checked = 0
        var worst = 0.0
        for row in Self.rows where row["decodes_cleanly"] == "yes" {
            let name = row["file"]!
            let path = Support.corpusFile(name)
            let probe = try Support.probe(path)
            let index = try #require(probe["audio_stream"]?.intValue, "\(name): probe finds the audio stream")
            let stream = try #require(probe["streams"]?.arrayValue?[index])
            #expect(stream["type"] == "audio" && stream["sample_rate"] != nil && stream["channels"] != nil)
            let decoded: AudioSupport.Decoded
            do {
                decoded = try AudioSupport.decode(path, AudioSupport.options(rate: rate, channels: channels))
            } catch {
                #expect(Self.cleanExceptions[name] == error.reason, "\(name): \(error)")
                #expect(error.message.contains(name))
                continue
            }
            #expect(Self.cleanExceptions[name] == nil, "\(name) should have failed")
            let audio = try #require(decoded.result.audio)
            #expect(audio.shape == [channels, decoded.planes[0].count])
            #expect(audio.sampleRate == rate && audio.channels == channels)
            #expect(!decoded.result.partial, "\(name): \(decoded.result.partialDetail ?? "")")
            #expect(decoded.result.video == nil)
            let gap = Self.timestampGaps[name]
            if let gap {
                #expect(decoded.result.warnings.contains { $0.contains("gap") }, "\(name): gap reported")
                #expect(abs((audio.paddedSeconds ?? 0) - gap) < 0.002, "\(name): padded \(audio.paddedSeconds ?? 0)")
            } else {
                #expect(!decoded.result.warnings.contains { $0.contains("gap") }, "\(name): \(decoded.result.warnings)")
            }

            let reference = try AudioSupport.ffmpegAudio(
                path, stream: index, rate: rate, channels: channels,
                filter: gap != nil ? "aresample=async=1:min_hard_comp=0.002" : nil)
            // Our sample i is at start + i/R; the reference's sample j at the stream's first sample.
            let offset = Int(((audio.streamStart! - audio.start) * Double(rate)).rounded())
            let ours = decoded.planes.map { Array($0.dropFirst(max(0, offset))) }
            let theirs = reference.map { Array($0.dropFirst(max(0, -offset))) }
            let n = min(ours[0].count, theirs[0].count)

            // Length: within one codec frame (at the output rate) of the independent decode.
            let frame = stream["frame_size"]?.intValue ?? 4096
            let inputRate = stream["sample_rate"]?.intValue ?? rate
            let slack = Int((Double(max(frame, 1)) * Double(rate) / Double(max(inputRate / 2, 1))).rounded(.up)) + 2
            let ourLength = decoded.planes[0].count - offset
            #expect(abs(ourLength - reference[0].count) <= slack, "\(name): \(ourLength) vs ffmpeg's \(reference[0].count) samples")

            let error = AudioSupport.relativeRMS(ours.map { Array($0.prefix(n)) }, theirs.map { Array($0.prefix(n)) })
            #expect(error <= Self.bound, "\(name): relative RMS error \(error)")
            worst = max(worst, error)
            checked += 1
        }
        #expect(checked >= 70)
        print("audio corpus \(rate) Hz × \(channels): \(checked) files, worst relative RMS error \(worst)")
    }

    /// ASF stores times in whole milliseconds while WMA frames are not whole milliseconds long
    /// (2048 samples: 42.67 ms at 48 kHz, 46.44 ms at 44.1 kHz): that rounding must never be taken
    /// for a gap or an overlap. The sample count equals `ffmpeg -ar -ac`'s within the resampler's
    /// delay, with no gap/overlap warning — for WMA from the ffmpeg CLI at the usual rates, and for
    /// the corpus's audio re-encoded to WMA (files whose source holds a real timestamp gap excepted).
    @Test func wmaTimestampRoundingIsNotAGapOrAnOverlap() throws {
        let directory = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var made: [(String, String)] = []
        for (rate, channels, seconds, codec) in [
            (48_000, 1, 3.712, "wmav2"), (48_000, 2, 3.712, "wmav2"), (44_100, 2, 3.712, "wmav2"),
            (44_100, 1, 7.3, "wmav1"), (22_050, 1, 5.0, "wmav2"), (32_000, 2, 2.5, "wmav2"),
        ] {
            let path = "\(directory)/noise-\(rate)-\(channels)-\(seconds)-\(codec).wma"
            try Support.ffmpeg([
                "-f", "lavfi", "-i", "anoisesrc=d=\(seconds):c=pink:r=\(rate):a=0.3:seed=7", "-ac", "\(channels)", "-c:a", codec, path,
            ])
            made.append((path, "\(rate) Hz × \(channels) \(codec)"))
        }
        if Support.hasCorpus {
            for row in Self.rows where row["decodes_cleanly"] == "yes" && (row["WxH"] ?? "-") == "-" {
                let name = row["file"]!
                guard Self.timestampGaps[name] == nil, Self.cleanExceptions[name] == nil, made.count < 30 else { continue }
                let path = "\(directory)/\(made.count).wma"
                guard (try? Support.ffmpeg(["-i", Support.corpusFile(name), "-vn", "-t", "6", "-c:a", "wmav2", path])) != nil else { continue }
                made.append((path, name))
            }
        }
        #expect(made.count >= 20 || !Support.hasCorpus)
        for (path, label) in made {
            let reference = try AudioSupport.ffmpegAudio(path, stream: 0, rate: 16_000, channels: 1)
            let decoded: AudioSupport.Decoded
            do { decoded = try AudioSupport.decode(path, AudioSupport.options()) } catch {
                // A source too short to yield one WMA frame (a 1-frame AMR file): no samples either way.
                #expect(reference[0].isEmpty && error.reason == .decodeError, "\(label): \(error); ffmpeg decodes \(reference[0].count) samples")
                continue
            }
            let ours = decoded.planes[0].count
            // swresample's delay at 16 kHz: a few dozen samples either way.
            #expect(abs(ours - reference[0].count) <= 48, "\(label): \(ours) samples, ffmpeg \(reference[0].count)")
            #expect(
                !decoded.result.warnings.contains { $0.contains("overlap") || $0.contains("gap") },
                "\(label): \(decoded.result.warnings)")
        }
    }

    /// 5.1 Opus (and 4-channel AIFF) downmixed with swresample's standard matrix, as `-ac` does.
    @Test(arguments: [
        ("libwebm__bbb_480p_vp9_opus_1second.webm", 1), ("libwebm__bbb_480p_vp9_opus_1second.webm", 2),
        ("mutagen__8k-4ch-1s-silence.aif", 1), ("pydub__test-192khz-32bit.flac", 1),
    ])
    func downmixMatchesFFmpeg(_ name: String, _ channels: Int) throws {
        try #require(Support.hasCorpus)
        let path = Support.corpusFile(name)
        let probe = try Support.probe(path)
        let index = probe["audio_stream"]!.intValue!
        let decoded = try AudioSupport.decode(path, AudioSupport.options(rate: 16_000, channels: channels))
        let audio = decoded.result.audio!
        let reference = try AudioSupport.ffmpegAudio(path, stream: index, rate: 16_000, channels: channels)
        let offset = Int(((audio.streamStart! - audio.start) * 16_000).rounded())
        let ours = decoded.planes.map { Array($0.dropFirst(max(0, offset))) }
        let theirs = reference.map { Array($0.dropFirst(max(0, -offset))) }
        let n = min(ours[0].count, theirs[0].count)
        #expect(n > 10_000)
        #expect(AudioSupport.relativeRMS(ours.map { Array($0.prefix(n)) }, theirs.map { Array($0.prefix(n)) }) <= Self.bound)
        if name.contains("bbb") {
            #expect(decoded.result.source.audioChannels == 6)
            #expect(decoded.result.source.audioChannelLayout == "5.1")
            // A quiet clip (peak 0.01): every output channel carries signal.
            #expect(decoded.planes.allSatisfy { plane in plane.contains { abs($0) > 0.002 } })
        }
    }

    /// Audio-in-video: with the video, the audio covers exactly the video's span and sits on the
    /// same grid as an audio-only decode of the same file.
    /// A range past the end of the audio is the request's mistake (as for video), not an empty
    /// tensor presented as success; whether packets before it were skipped or decoded.
    @Test(arguments: [AccessPolicy.auto, .sequential])
    func aRangePastTheEndOfTheAudioIsRefused(_ access: AccessPolicy) throws {
        let directory = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/tone.m4a"
        try Support.ffmpeg(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=20", "-c:a", "aac", path])
        var o = AudioSupport.options(video: false)
        o.start = 21
        o.end = 22
        let failure = #expect(throws: DecodeFailure.self) { try AudioSupport.decode(path, o, access: access) }
        #expect(failure?.reason == .invalidRequest, "\(String(describing: failure))")
        #expect(failure?.detail == "start")
        o.start = 5
        o.end = 6
        let inside = try AudioSupport.decode(path, o, access: access)
        #expect(inside.result.audio?.shape == [1, 16_000])
        #expect(!inside.result.warnings.contains { $0.contains("container says") }, "\(inside.result.warnings)")
    }

    @Test func audioInVideoCoversTheVideoSpan() throws {
        try #require(Support.hasCorpus)
        var checked = 0
        for row in Self.rows where row["decodes_cleanly"] == "yes" && (row["WxH"] ?? "-") != "-" {
            let name = row["file"]!
            guard Self.cleanExceptions[name] == nil, CorpusTests.cleanExceptions[name] == nil else { continue }
            let path = Support.corpusFile(name)
            var both = AudioSupport.options(video: true)
            both.selection = .count(2)
            both.frameFactor = 1
            both.width = 32
            both.height = 32
            let decoded: AudioSupport.Decoded
            do { decoded = try AudioSupport.decode(path, both) } catch {
                // Files whose only video is cover art, or with a single frame.
                #expect(
                    (error.reason == .unsupported && error.message.contains("no video stream"))
                        || error.reason == .invalidRequest, "\(name): \(error)")
                continue
            }
            let audio = try #require(decoded.result.audio), video = try #require(decoded.result.video)
            #expect(decoded.header.tensors.map(\.name) == ["video", "audio"])
            #expect(audio.start == 0)
            #expect(audio.offsetFromFirstFrame == audio.start - video.pts[0])
            let end = Double(audio.shape[1]) / 16_000
            let fps = try #require(decoded.result.source.fps)
            // Two frames are taken: the first and the last; the audio ends where the last one does.
            #expect(end > video.pts.last! && end <= video.pts.last! + 2.5 / fps + 1e-3, "\(name): audio ends at \(end), last frame at \(video.pts.last!)")
            let alone = try AudioSupport.decode(path, AudioSupport.options())
            let shift = Int((alone.result.audio!.start * 16_000).rounded())
            // Same grid: equal samples wherever both have audio from the stream.
            let streamStart = max(0, Int((audio.streamStart! * 16_000).rounded()))
            let streamEnd = min(
                audio.shape[1], Int((audio.streamEnd! * 16_000).rounded(.down)) - 1, alone.planes[0].count + shift)
            if streamEnd > streamStart {
                let a = Array(decoded.planes[0][streamStart..<streamEnd])
                let b = Array(alone.planes[0][(streamStart - shift)..<(streamEnd - shift)])
                #expect(a == b, "\(name): audio with video differs from audio alone")
            }
            checked += 1
        }
        #expect(checked >= 20)
    }

    /// The origin-only packet pass (audio without video) finds the same origin as the full table.
    @Test func originScanStopsEarlyWithTheSameOrigin() throws {
        try #require(Support.hasCorpus)
        var checked = 0
        for row in Support.manifest() where (row["WxH"] ?? "-") != "-" && row["decodes_cleanly"] == "yes" {
            let path = Support.corpusFile(row["file"]!)
            let tables = try Support.withEngine { () throws(DecodeFailure) -> (FrameTable, FrameTable)? in
                let first = try Demuxer(path: path, displayPath: path)
                guard let index = first.bestStream(AVMEDIA_TYPE_VIDEO) else { return nil }
                let full = try FrameTable.scan(first, streamIndex: index)
                let quick = try FrameTable.scan(Demuxer(path: path, displayPath: path), streamIndex: index, originOnly: true)
                return (full, quick)
            }
            guard let (full, quick) = tables, full.count > 0, full.timed else { continue }
            #expect(quick.originTicks == full.originTicks, "\(row["file"]!)")
            #expect(quick.packets.count <= full.packets.count)
            checked += 1
        }
        #expect(checked >= 50)
    }

    @Test func probeReportsAudioStreams() throws {
        try #require(Support.hasCorpus)
        let bbb = try Support.probe(Support.corpusFile("libwebm__bbb_480p_vp9_opus_1second.webm"))
        let stream = bbb["streams"]!.arrayValue!.first { $0["type"] == "audio" }!
        #expect(stream["codec"] == "opus")
        #expect(stream["channels"] == 6)
        #expect(stream["channel_layout"] == "5.1")
        #expect(stream["sample_rate"] == 48000)
        #expect(stream["start_time"]!.doubleValue! < 0)  // Opus pre-skip before the first sample
        let he = try Support.probe(Support.corpusFile("pymediainfo__aac_he_v2.aac"))
        #expect(he["streams"]!.arrayValue![0]["profile"] == "HE-AACv2")
        let mp3 = try Support.probe(Support.corpusFile("pydub__party.mp3"))
        let s = mp3["streams"]!.arrayValue!.first { $0["type"] == "audio" }!
        #expect(s["duration"]!.doubleValue! > 6 && s["channel_layout"] == "mono" && s["frame_size"] == 1152)
        #expect(mp3["source"]?["audio_codec"] == "mp3")
    }

    /// Damaged audio: a clean error naming the file or an honest partial result; never a crash
    /// or a hang (each decode is a subprocess with a time limit).
    @Test func brokenAudioFailsCleanly() throws {
        try #require(Support.hasCorpus)
        let named = [
            "minimp3__l3-compl-cut.mp3", "mutagen__106-invalid-streaminfo.flac", "mediafile__full.wma",
            "mp4parse-rust__sine-3s-xhe-aac-44khz-mono.mp4", "mutagen__adif.aac", "mutagen__almostempty.mpc",
            "minimp3__ILL4_sync.bit", "mutagen__empty.spx", "pydub__test1_empty.wav",
        ]
        let broken = Self.rows.filter { $0["decodes_cleanly"] != "yes" }.map { $0["file"]! }
        let verdicts = Dictionary(uniqueKeysWithValues: Support.manifest().map { ($0["file"]!, $0["decodes_cleanly"] ?? "") })
        var outcomes: [String: String] = [:]
        for name in broken + named {
            let r = try Support.run(
                [Support.worker, "decode", Support.corpusFile(name), "--audio", "--no-video", "--level", "1"], timeout: 60)
            #expect(!r.timedOut, "\(name) hung")
            #expect(r.signal == nil, "\(name) crashed with signal \(r.signal ?? 0)")
            #expect(r.status == 0 || r.status == 1, "\(name): exit \(r.status)")
            let json = try JSONValue.parse(Array(r.stdout.utf8))
            if r.status == 1 {
                let failure = try #require(DecodeFailure(json: json), "\(name): error object")
                #expect(failure.message.contains(name), "\(name): message names the file")
                #expect([.decodeError, .unsupported].contains(failure.reason), "\(name): \(failure)")
                outcomes[name] = failure.reason.rawValue
            } else {
                let result = try JSONCoding.decode(DecodeResult.self, from: json)
                let audio = try #require(result.audio)
                #expect(audio.shape[1] > 0)
                if verdicts[name] == "no" {
                    #expect(result.partial, "\(name): damaged file returned as a clean success")
                }
                outcomes[name] = result.partial ? "partial" : "ok"
                if name == "mediafile__emptylist.mp3" {
                    // 8 KiB whose header promises 217 s: measured by decoding, with a warning.
                    #expect(result.warnings.contains { $0.contains("217.104") && $0.contains("measured by decoding") })
                    #expect(Double(audio.shape[1]) / 16_000 < 2)
                }
            }
        }
        #expect(outcomes["mp4parse-rust__sine-3s-xhe-aac-44khz-mono.mp4"] == "unsupported")
        #expect(outcomes["mp4parse-rust__short-cenc.mp4"] == "unsupported")
        #expect(outcomes["mutagen__flac_application.flac"] == "decode_error")
        #expect(outcomes["mutagen__52-too-short-block-size.flac"] == "partial")
        #expect(outcomes.count >= 20)
    }
}

/// Alignment, edges, limits and the block layout, on clips generated with the ffmpeg CLI.
@Suite(.serialized, .timeLimit(.minutes(10)))
struct AudioAlignmentTests {
    static let toneStart = 2.5

    /// 5 s of 320x240 30 fps H.264 (B-frames) with a 1 kHz tone that starts at exactly 2.5 s:
    /// PCM in MOV, AAC in MP4, and FLAC in Matroska with the audio starting 0.5 s after the video.
    static let fixtures: Result<[String: String], Error> = Result {
        let dir = try Support.temporaryDirectory()
        let video = ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30:duration=5"]
        let tone = "aevalsrc='if(gte(t,\(toneStart)),0.5*sin(2*PI*1000*(t-\(toneStart))),0)':s=48000:d=5"
        let x264 = ["-c:v", "libx264", "-preset", "ultrafast", "-g", "15", "-bf", "2", "-pix_fmt", "yuv420p"]
        var out: [String: String] = [:]
        out["pcm"] = dir + "/tone_pcm.mov"
        try Support.ffmpeg(video + ["-f", "lavfi", "-i", tone] + x264 + ["-c:a", "pcm_s16le", out["pcm"]!])
        out["aac"] = dir + "/tone_aac.mp4"
        try Support.ffmpeg(video + ["-f", "lavfi", "-i", tone] + x264 + ["-c:a", "aac", "-b:a", "128k", out["aac"]!])
        out["late"] = dir + "/tone_late.mkv"
        try Support.ffmpeg(
            video + ["-itsoffset", "0.5", "-f", "lavfi", "-i", tone] + x264 + ["-c:a", "flac", out["late"]!])
        out["silent"] = dir + "/silent.mp4"
        try Support.ffmpeg(video + x264 + ["-t", "2", out["silent"]!])
        return out
    }

    /// The tone's onset sample, on the clip's time origin, is where the timestamps put it: within
    /// 1 ms plus the resampler's filter half-length (16 taps at the lower of the two rates), with
    /// and without start/end. AAC smears a transient over its 1024-sample window (pre-echo), so
    /// its onset is allowed one AAC frame (21 ms) early.
    @Test(arguments: [("pcm", 0.0), ("late", 0.5), ("aac", 0.0)])
    func toneOnsetMatchesFramePts(_ kind: String, _ delay: Double) throws {
        let path = try #require(try Self.fixtures.get()[kind])
        let rate = 16_000
        let filterDelay = 16.0 / Double(min(48_000, rate))
        let early = kind == "aac" ? 1024.0 / 48_000 : 0
        for (start, end) in [(nil, nil), (1.0, 4.0), (2.0, 3.5)] as [(Double?, Double?)] {
            var o = AudioSupport.options(rate: rate, video: true)
            o.start = start
            o.end = end
            o.selection = .rate(fps: 2)
            let d = try AudioSupport.decode(path, o)
            let audio = try #require(d.result.audio), video = try #require(d.result.video)
            #expect(audio.start == (start ?? 0))
            #expect(abs(audio.offsetFromFirstFrame! - (audio.start - video.pts[0])) < 1e-12)
            let spanEnd = end ?? 5.0
            #expect(audio.shape[1] == Int(((spanEnd - (start ?? 0)) * Double(rate)).rounded()), "\(kind) \(start ?? 0)–\(spanEnd)")
            let onset = try #require(AudioSupport.onset(d.planes[0]))
            let onsetTime = audio.start + Double(onset) / Double(rate)
            let expected = Self.toneStart + delay
            print("\(kind) [\(start ?? 0), \(end ?? 5)): onset \(onsetTime) s, expected \(expected) s, error \((onsetTime - expected) * 1000) ms")
            #expect(onsetTime - expected <= 0.001 + filterDelay)
            #expect(expected - onsetTime <= 0.001 + filterDelay + early)
            #expect(!d.result.partial)
            if delay > 0 {
                #expect(abs(audio.streamStart! - delay) < 0.001)
                if start == nil {
                    #expect(d.result.warnings.contains { $0.contains("silence before its first sample") })
                    #expect(d.planes[0].prefix(Int(delay * Double(rate)) - 16).allSatisfy { $0 == 0 })
                }
            }
            // Audio alone, same origin: the same onset time.
            var alone = AudioSupport.options(rate: rate)
            alone.start = start
            alone.end = end
            let a = try AudioSupport.decode(path, alone)
            let aloneOnset = try #require(AudioSupport.onset(a.planes[0]))
            #expect(abs(a.result.audio!.start + Double(aloneOnset) / Double(rate) - onsetTime) < 1e-9)
        }
    }

    /// Encoder delay and padding are trimmed: 30 s of audio give 30 s × R samples.
    @Test(arguments: [("wav", "pcm_s16le"), ("mp3", "libmp3lame"), ("m4a", "aac"), ("opus", "libopus"),
                      ("ogg", "libvorbis"), ("flac", "flac")])
    func thirtySecondsGiveThirtySecondsOfSamples(_ ext: String, _ codec: String) throws {
        let dir = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/sine30." + ext
        try Support.ffmpeg(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=30", "-c:a", codec, path])
        for rate in [16_000, 44_100] {
            let d = try AudioSupport.decode(path, AudioSupport.options(rate: rate))
            let audio = try #require(d.result.audio)
            #expect(audio.shape[1] == 30 * rate, "\(ext) at \(rate) Hz: \(audio.shape[1]) samples")
            #expect(audio.streamStart == 0 && audio.start == 0)
            #expect(d.result.warnings.isEmpty, "\(d.result.warnings)")
            #expect(!d.result.partial)
            // The sine is there from the first sample to the last (no priming silence left in).
            let head = d.planes[0].prefix(rate / 100).map(abs).max()!
            let tail = d.planes[0].suffix(rate / 100).map(abs).max()!
            #expect(head > 0.05 && tail > 0.05, "\(ext): head \(head), tail \(tail)")
        }
    }

    /// A late `start` leaves the packets long before it undecoded, and still gives a full decode's
    /// samples: bit-identical, except AAC's noise-substituted bands (random by design).
    @Test(arguments: [("wav", "pcm_s16le"), ("mp3", "libmp3lame"), ("m4a", "aac"), ("opus", "libopus"),
                      ("ogg", "libvorbis"), ("flac", "flac"), ("mkv", "aac")])
    func lateStartMatchesFullDecode(_ ext: String, _ codec: String) throws {
        let dir = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/long." + ext
        try Support.ffmpeg([
            "-filter_complex",
            "anoisesrc=color=pink:amplitude=0.2:r=44100:d=40,volume='0.4+0.3*sin(2*PI*0.3*t)':eval=frame[n];"
                + "aevalsrc='0.2*sin(2*PI*(300+40*t)*t)':s=44100:d=40[c];[n][c]amix=inputs=2:normalize=0[a]",
            "-map", "[a]", "-c:a", codec, path,
        ])
        for (start, end, rate) in [(20.0, 30.0, 16_000), (13.3, 17.01, 16_000), (9.0, nil, 44_100)] as [(Double, Double?, Int)] {
            var o = AudioSupport.options(rate: rate)
            o.start = start
            o.end = end
            let full = try AudioSupport.decode(path, o, access: .sequential)
            let skipped = try AudioSupport.decode(path, o)
            #expect(full.result.audio!.shape == skipped.result.audio!.shape)
            #expect(!full.result.partial && !skipped.result.partial, "\(skipped.result.partialDetail ?? "")")
            if ext == "m4a" {
                #expect(AudioSupport.relativeRMS(skipped.planes, full.planes) < 1e-2)
            } else {
                #expect(skipped.planes == full.planes, "\(ext) [\(start), \(end ?? 40)) at \(rate) Hz")
            }
            // Packets were really skipped, except in Matroska (1 ms timestamps are not sample-exact).
            let skippedPackets = try Support.withEngine { () throws(DecodeFailure) in
                let demuxer = try Demuxer(path: path, displayPath: path)
                let plan = AudioTrackReader.Plan(
                    origin: .firstSample, start: start, end: end, padToEnd: false, rate: rate, channels: 1, threads: 1,
                    byteBudget: 1 << 30)
                let reader = try AudioTrackReader(
                    demuxer: demuxer, streamIndex: try ClipDecoder.chooseAudioStream(demuxer, path: path, withVideo: false), plan: plan,
                    path: path)
                return try reader.run().skippedPackets
            }
            #expect(ext == "mkv" ? skippedPackets == 0 : skippedPackets > 0, "\(ext): \(skippedPackets) packets skipped")
        }
    }

    @Test func videoWithoutAudio() throws {
        let path = try #require(try Self.fixtures.get()["silent"])
        var o = AudioSupport.options(video: true)
        do {
            _ = try AudioSupport.decode(path, o)
            Issue.record("audio from a silent video should be unsupported")
        } catch {
            #expect(error.reason == .unsupported)
            #expect(error.message.contains("no audio stream") && error.message.contains(path))
        }
        o.audioOptional = true
        let d = try AudioSupport.decode(path, o)
        #expect(d.result.audio == nil && d.result.video != nil)
        #expect(d.header.tensors.map(\.name) == ["video"])
        #expect(d.result.warnings.contains { $0.contains("audio_optional") && $0.contains("no audio stream") })
        o.video = false
        let alone = #expect(throws: DecodeFailure.self) { try AudioSupport.decode(path, o) }
        #expect(alone?.detail?.contains("audio_optional") == false, "audio_optional does not apply without video")
    }

    @Test func blockHoldsOneFramePerChannelPerSecond() throws {
        try #require(Support.hasCorpus)
        let d = try AudioSupport.decode(
            Support.corpusFile("hf-datasets__test_audio_44100.wav"), AudioSupport.options(rate: 16_000, channels: 2))
        let tensor = try #require(d.header.tensors.first)
        #expect(tensor.name == "audio" && tensor.dtype == .float32 && tensor.layout == "CN")
        #expect(tensor.shape == [2, 73_401])
        let perChannel = [64_000, 64_000, 64_000, 64_000, 4 * (73_401 - 64_000)]
        #expect(tensor.frameSizes == perChannel + perChannel)
        #expect(d.planes[0] != d.planes[1])

        let fixture = try #require(try Self.fixtures.get()["pcm"])
        var both = AudioSupport.options(video: true)
        both.selection = .count(4)
        let v = try AudioSupport.decode(fixture, both)
        #expect(v.header.tensors.map(\.name) == ["video", "audio"])
        #expect(v.header.tensors[1].frameSizes == [64_000, 64_000, 64_000, 64_000, 64_000])
    }

    @Test func outputLimitCountsAudio() throws {
        try #require(Support.hasCorpus)
        // Before decoding, from the container's duration (30 s × 16 kHz × 4 bytes = 1.92 MB).
        var o = AudioSupport.options()
        o.maxOutputBytes = 1_000_000
        do {
            _ = try AudioSupport.decode(Support.corpusFile("librosa__snare-accelerate.ogg"), o)
            Issue.record("expected too_large")
        } catch {
            #expect(error.reason == .tooLarge)
            #expect(error.message.contains("about 1920000 bytes of audio"))
        }
        // While decoding, when the container has no duration.
        o.maxOutputBytes = 100_000
        do {
            _ = try AudioSupport.decode(Support.corpusFile("moviepy__no_duration.webm"), o)
            Issue.record("expected too_large")
        } catch {
            #expect(error.reason == .tooLarge)
            #expect(error.message.contains("while decoding"))
        }
        // Video and audio share the budget.
        let fixture = try #require(try Self.fixtures.get()["pcm"])
        var both = AudioSupport.options(video: true)
        both.selection = .count(4)
        both.maxOutputBytes = 4 * 3 * 320 * 240 + 5 * 64_000 - 1
        #expect(throws: DecodeFailure.self) { try AudioSupport.decode(fixture, both) }
        both.maxOutputBytes += 1
        #expect(try AudioSupport.decode(fixture, both).result.audio?.shape == [1, 80_000])
    }
}
