import Foundation
import Shared
import Testing

@testable import DecodeWorker

/// Pixels against independent decodes. Bounds:
/// - against `ffmpeg -pix_fmt rgb24` with the worker's own scaler flags: ≥ 50 dB (in practice
///   bit-identical: same decoder, same swscale path);
/// - against torchcodec's reference frames: ≥ 40 dB. At native size the worker converts the way
///   torchcodec and ffmpeg's default do (swscale's SIMD YUV→RGB path); resized frames use
///   bicubic with accurate rounding and full chroma interpolation.
@Suite(.serialized, .timeLimit(.minutes(10)))
struct PixelTests {
    static func compare(
        _ name: String, options: DecodeOptions, vfExtra: String = "", ffmpegArgs: [String] = [], bound: Double = 50
    ) throws {
        let path = name.hasPrefix("/") ? name : Support.corpusFile(name)
        var options = options
        options.layout = .thwc
        let (result, ours) = try Support.decode(path, options)
        let video = try #require(result.video)
        let select = video.indices.map { "eq(n\\,\($0))" }.joined(separator: "+")
        var vf = "select='\(select)'"
        vf += vfExtra.isEmpty ? ",scale=flags=\(Support.swsNativeFlags)" : "," + vfExtra
        let reference = try Support.ffmpegFrames(path, vf: vf, extra: ffmpegArgs)
        try #require(reference.count == ours.count, "\(name): \(reference.count) reference bytes vs \(ours.count)")
        let frameBytes = 3 * video.width * video.height
        for t in 0..<video.shape[0] {
            let range = t * frameBytes..<(t + 1) * frameBytes
            let p = Support.psnr(ours[range], reference[range])
            #expect(p >= bound, "\(name) frame \(video.indices[t]): \(p) dB")
        }
    }

    static func frames(_ n: Int) -> DecodeOptions {
        var o = DecodeOptions()
        o.selection = .count(n)
        o.frameFactor = 1
        return o
    }

    @Test(arguments: [
        "torchcodec__h265_10bits.mp4",  // 10-bit
        "torchcodec__bt709_full_range.mp4",  // yuvj420p, BT.709 full range
        "libavg__rgba-48x48.mov",  // argb (alpha dropped)
        "libavg__vp6a-yuva-48x48.flv",  // yuva420p (alpha dropped)
        "jcodec__out9_sm.webm",  // 178x100
        "hf-datasets__test_video_66x50.mov",  // 66x50
        "imageio-test_images__cockatoo.mp4",  // yuv444p
        "jcodec__test.prores.mov",  // yuv422p10le
        "nwb-video-widgets__stub_mjpeg.avi",  // MJPEG yuvj420p
        "mp4parse-rust__video_colr_nclx_rgb.mp4",  // gbrp
    ])
    func nativeSizeMatchesFFmpeg(_ name: String) throws {
        try #require(Support.hasCorpus)
        try Self.compare(name, options: Self.frames(2))
    }

    /// Paletted video: the palette comes only with the first packet after opening (AVI, MOV),
    /// so the frames must not be read after a seek (they came out black).
    @Test(arguments: ["avi", "mov"])
    func palettedVideoKeepsItsPalette(_ container: String) throws {
        let directory = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/pal8.\(container)"
        try Support.ffmpeg([
            "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=2", "-c:v", "rawvideo", "-pix_fmt", "pal8", path,
        ])
        try Self.compare(path, options: Self.frames(4))
    }

    @Test func resizedMatchesFFmpeg() throws {
        try #require(Support.hasCorpus)
        var o = Self.frames(3)
        o.maxPixels = 448 * 448
        // 1280x720 → smart_resize with max 200704 → 588x336.
        try Self.compare(
            "torchcodec__bt709_full_range.mp4", options: o, vfExtra: "scale=588:336:flags=\(Support.swsFlags)")
        var exact = Self.frames(2)
        exact.width = 100
        exact.height = 77
        try Self.compare("jcodec__out9_sm.webm", options: exact, vfExtra: "scale=100:77:flags=\(Support.swsFlags)")
    }

    /// TCHW holds the same pixels as THWC, planar.
    @Test func layoutsAgree() throws {
        try #require(Support.hasCorpus)
        let path = Support.corpusFile("jcodec__out9_sm.webm")
        var o = Self.frames(2)
        let (planar, a) = try Support.decode(path, o)
        o.layout = .thwc
        let (packed, b) = try Support.decode(path, o)
        #expect(planar.video!.shape == [2, 3, 100, 178])
        #expect(packed.video!.shape == [2, 100, 178, 3])
        let frame = 3 * 100 * 178
        for t in 0..<2 {
            #expect(Support.planarToPacked(a[t * frame..<(t + 1) * frame], width: 178, height: 100) == Array(b[t * frame..<(t + 1) * frame]))
        }
    }

    /// At native size in THWC, rows of a multiple of 16 bytes are converted straight into the
    /// output buffer (FrameConverter's direct path), others through the scratch image: both give
    /// the bytes of the planar layout (always the scratch path) and ffmpeg's, every frame.
    @Test(arguments: [320, 328, 336])
    func directConversionGivesTheScratchPathsBytes(_ width: Int) throws {
        let directory = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/w\(width).mp4"
        try Support.ffmpeg([
            "-f", "lavfi", "-i", "testsrc2=size=\(width)x96:rate=25:duration=1,noise=alls=30:allf=t",
            "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", path,
        ])
        var o = Self.frames(25)
        let (planar, a) = try Support.decode(path, o)
        o.layout = .thwc
        let (packed, b) = try Support.decode(path, o)
        let frames = try #require(packed.video?.shape.first)
        #expect(frames == 25 && planar.video!.shape == [frames, 3, 96, width])
        let frame = 3 * 96 * width
        try #require(a.count == frames * frame && b.count == frames * frame)
        for t in 0..<frames {
            #expect(Support.planarToPacked(a[t * frame..<(t + 1) * frame], width: width, height: 96) == Array(b[t * frame..<(t + 1) * frame]), "frame \(t)")
        }
        try Self.compare(path, options: o)
    }

    struct Reference: Sendable {
        var file: String, reference: String, time: Double, bound: Double
    }

    @Test(arguments: [
        Reference(file: "torchcodec__nasa_13013.mp4", reference: "torchcodec__nasa_13013.mp4.stream3.frame000000.pt", time: 0, bound: 40),
        Reference(file: "torchcodec__nasa_13013.mp4", reference: "torchcodec__nasa_13013.mp4.stream3.frame000001.pt", time: 0.04, bound: 40),
        Reference(file: "torchcodec__nasa_13013.mp4", reference: "torchcodec__nasa_13013.mp4.stream3.frame000389.pt", time: 12.98, bound: 40),
        Reference(file: "torchcodec__h265_video.mp4", reference: "torchcodec__h265_video.mp4.stream0.frame000005.pt", time: 0.5, bound: 40),
        Reference(file: "torchcodec__av1_video.mkv", reference: "torchcodec__av1_video.mkv.stream0.frame000010.pt", time: 0.4, bound: 40),
    ])
    func matchesTorchcodec(_ r: Reference) throws {
        try #require(Support.hasCorpus)
        var o = DecodeOptions()
        o.selection = .timestamps([r.time])
        o.layout = .thwc
        let (result, ours) = try Support.decode(Support.corpusFile(r.file), o)
        let reference = try Self.torchPixels(Support.corpusFile("reference/" + r.reference))
        try #require(reference.count == ours.count)
        let p = Support.psnr(ours[...], reference[...])
        #expect(p >= r.bound, "\(r.reference): \(p) dB, index \(result.video!.indices)")
    }

    /// The raw pixels of a torch.save zip: the stored member whose name ends in /data/0.
    static func torchPixels(_ path: String) throws -> [UInt8] {
        let r = try Support.run([
            "python3", "-c",
            "import sys,zipfile; z=zipfile.ZipFile(sys.argv[1]); n=[x for x in z.namelist() if x.endswith('/data/0')][0]; sys.stdout.write(z.read(n).hex())",
            path,
        ])
        var bytes: [UInt8] = []
        bytes.reserveCapacity(r.stdout.utf8.count / 2)
        var high: UInt8?
        for c in r.stdout.utf8 {
            let v: UInt8 = c >= 97 ? c - 87 : c - 48
            if let h = high { bytes.append(h << 4 | v); high = nil } else { high = v }
        }
        return bytes
    }

    /// decord's rotation set and a 180° phone clip come out upright (as ffmpeg's autorotate shows
    /// them); --no-rotate keeps the stored orientation.
    @Test(arguments: [
        ("decord__video_90.mov", 90), ("decord__video_270.mov", 270), ("moviepy__fire2.mp4", 180),
        ("mp4parse-rust__video_rotation_90.mp4", 90), ("decord__video_0.mov", 0),
    ])
    func rotation(_ name: String, _ degrees: Int) throws {
        try #require(Support.hasCorpus)
        let path = Support.corpusFile(name)
        var o = Self.frames(1)
        o.layout = .thwc
        let (upright, _) = try Support.decode(path, o)
        #expect(upright.video!.rotationApplied == degrees)
        #expect(upright.source.rotation == degrees)
        let stored = (upright.source.width!, upright.source.height!)
        let swapped = degrees == 90 || degrees == 270
        #expect(upright.video!.width == (swapped ? stored.1 : stored.0))
        #expect(upright.video!.height == (swapped ? stored.0 : stored.1))
        try Self.compare(name, options: o)  // ffmpeg autorotates by default
        o.rotate = false
        let (asStored, _) = try Support.decode(path, o)
        #expect(asStored.video!.rotationApplied == 0)
        #expect(asStored.video!.width == stored.0 && asStored.video!.height == stored.1)
        try Self.compare(name, options: o, ffmpegArgs: ["-noautorotate"])
    }

    /// A display matrix that mirrors (horizontal flip) is not a rotation, though FFmpeg's
    /// rotation reading calls it 180°: the frames are returned as stored, with a warning.
    @Test func aMirroringDisplayMatrixIsNotTakenForARotation() throws {
        let directory = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/mirrored.mp4"
        try Support.ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1", "-c:v", "libx264", "-pix_fmt", "yuv420p", path])
        // The tkhd box's matrix starts 48 bytes into it (version 0); its first entry, 1.0 in
        // 16.16 fixed point, becomes -1.0.
        var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let tkhd = try #require(bytes.indices.dropLast(4).first { bytes[$0..<($0 + 4)].elementsEqual("tkhd".utf8) })
        let matrix = tkhd - 4 + 48
        #expect(bytes[matrix..<(matrix + 4)].elementsEqual([0x00, 0x01, 0x00, 0x00]))
        bytes.replaceSubrange(matrix..<(matrix + 4), with: [0xFF, 0xFF, 0x00, 0x00])
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        var o = Self.frames(1)
        o.layout = .thwc
        let (result, _) = try Support.decode(path, o)
        #expect(result.video!.rotationApplied == 0)
        #expect(result.warnings.contains { $0.contains("mirrors") }, "\(result.warnings)")
        try Self.compare(path, options: o, ffmpegArgs: ["-noautorotate"])
    }
}
