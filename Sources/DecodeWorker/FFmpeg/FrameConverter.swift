import CFFmpeg
import CPixelKernels
import Shared

/// Converts decoded frames to RGB24 at the output size and orientation.
///
/// swscale does colour conversion and resizing in one pass, with the frame's own matrix
/// (BT.601/709/2020...) and range (limited/full) via `sws_setColorspaceDetails`. Two paths,
/// chosen by cost (bench/benchmarks: colour conversion, not decoding, dominated small clips):
/// - **resized**: bicubic (swscale widens the filter when downscaling, which antialiases) with
///   accurate rounding and full chroma interpolation, into planar GBRP — swscale's planar
///   writer costs the same with or without those flags, and far less than its packed RGB24 one;
/// - **native size**: plain bicubic into packed RGB24, which swscale does with its SIMD
///   YUV→RGB converters (chroma upsampled the way FFmpeg, PyAV, decord and torchcodec do by
///   default); accurate rounding alone would make this ~10× slower.
/// swscale writes into an aligned scratch buffer (its SIMD paths may write past a row's end);
/// `place` then copies, (de)interleaves and rotates into the contiguous output frame, in the
/// requested layout. Where the scratch image already is the output (native size, THWC, no
/// rotation) and a row is a multiple of 16 bytes, swscale writes straight into the output
/// buffer instead, saving a copy of every frame (docs/benchmarks.md). At such widths swscale
/// 5.1 writes no byte past a row (its SSSE3 converter stores 16 pixels at a time; its C writers
/// are exact; checked for every input format, at every x86 SIMD level, and 25 widths × 19
/// heights); at others the SSSE3 tail may write 24 bytes past a row, and with a tight stride it
/// leaves a row's last `width % 8` pixels unwritten, hence the condition. Rows are written top to
/// bottom, and the buffer keeps `overrunBytes` past the frame, so even a spill would land on a
/// row written later or in that slack, never outside the buffer.
final class FrameConverter {
    let outputWidth: Int
    let outputHeight: Int
    /// Clockwise degrees applied after scaling: 0, 90, 180 or 270.
    let rotation: Int
    let layout: DecodeOptions.Layout
    /// The size swscale produces (before rotation).
    let scaledWidth: Int
    let scaledHeight: Int
    private var sws: OpaquePointer?
    private var swsKey: [Int32] = []
    /// Whether the last context converts at native size into packed RGB24 (else planar GBRP).
    private var packedScratch = false
    private let scratchStride: Int
    private var scratch: UnsafeMutableRawPointer
    private let scratchBytes: Int

    /// Flags of the resizing path (into GBRP).
    static let resizeFlags = SWS_BICUBIC | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT | SWS_FULL_CHR_H_INP
    /// Flags of the native-size path (into RGB24, SIMD).
    static let nativeFlags = SWS_BICUBIC | SWS_FULL_CHR_H_INP

    var frameBytes: Int { 3 * outputWidth * outputHeight }
    /// Bytes past the frame that `convert` may overwrite: a buffer it writes into holds
    /// `frameBytes + overrunBytes`.
    static let overrunBytes = 64
    var bufferBytes: Int { frameBytes + Self.overrunBytes }

    init(width: Int, height: Int, rotation: Int, layout: DecodeOptions.Layout) {
        outputWidth = width
        outputHeight = height
        self.rotation = rotation
        self.layout = layout
        let swapped = rotation == 90 || rotation == 270
        scaledWidth = swapped ? height : width
        scaledHeight = swapped ? width : height
        // Room for either three planes or one packed image.
        scratchStride = (3 * scaledWidth + 63) & ~63
        scratchBytes = scratchStride * scaledHeight + 64
        scratch = UnsafeMutableRawPointer.allocate(byteCount: scratchBytes * 3, alignment: 64)
    }

    deinit {
        sws_freeContext(sws)
        scratch.deallocate()
    }

    /// Converts `frame` into the first `frameBytes` bytes of `output`, which holds
    /// `bufferBytes` (the rest may be overwritten).
    func convert(_ frame: Frame, into output: UnsafeMutableRawBufferPointer, path: String) throws(DecodeFailure) {
        precondition(output.count >= bufferBytes, "a frame buffer holds frameBytes + overrunBytes")
        let f = frame.pointer
        let format = AVPixelFormat(rawValue: f.pointee.format)
        let fullRange = f.pointee.color_range == AVCOL_RANGE_JPEG || Self.isJPEGFormat(format)
        let key: [Int32] = [f.pointee.width, f.pointee.height, f.pointee.format,
                            Int32(f.pointee.colorspace.rawValue), fullRange ? 1 : 0]
        if key != swsKey || sws == nil {
            packedScratch = Int(f.pointee.width) == scaledWidth && Int(f.pointee.height) == scaledHeight
            sws = sws_getCachedContext(
                sws, f.pointee.width, f.pointee.height, format, Int32(scaledWidth), Int32(scaledHeight),
                packedScratch ? AV_PIX_FMT_RGB24 : AV_PIX_FMT_GBRP, packedScratch ? Self.nativeFlags : Self.resizeFlags,
                nil, nil, nil)
            guard let sws else {
                let name = av_get_pix_fmt_name(format).map { String(cString: $0) } ?? "format \(f.pointee.format)"
                throw DecodeFailure(
                    .unsupported, "\(path): cannot convert \(name) \(f.pointee.width)x\(f.pointee.height) to RGB",
                    path: path, detail: "sws_getCachedContext failed")
            }
            // Colour matrix of the source (sws_getCoefficients maps unspecified to BT.601, as
            // FFmpeg does), its range, and full-range RGB out. Ignored for RGB sources.
            let table = sws_getCoefficients(Int32(f.pointee.colorspace.rawValue))
            _ = sws_setColorspaceDetails(
                sws, table, fullRange ? 1 : 0, sws_getCoefficients(SWS_CS_DEFAULT), 1, 0, 1 << 16, 1 << 16)
            swsKey = key
        }
        var dst: [UnsafeMutablePointer<UInt8>?] = [nil, nil, nil, nil]
        var strides: [Int32] = [0, 0, 0, 0]
        let base = scratch.assumingMemoryBound(to: UInt8.self)
        let outputBase = output.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let direct = packedScratch && rotation == 0 && layout == .thwc && (3 * outputWidth) % 16 == 0
            && Int(bitPattern: outputBase) % 16 == 0
        if direct {
            dst[0] = outputBase
            strides[0] = Int32(3 * outputWidth)
        } else if packedScratch {
            dst[0] = base
            strides[0] = Int32(scratchStride)
        } else {
            // GBRP's planes are G, B, R; scratch planes are kept in R, G, B order.
            dst[0] = base + scratchBytes      // G
            dst[1] = base + 2 * scratchBytes  // B
            dst[2] = base                     // R
            strides = [Int32(scratchStride), Int32(scratchStride), Int32(scratchStride), 0]
        }
        let rows = dst.withUnsafeBufferPointer { d in
            strides.withUnsafeBufferPointer { s in
                cffmpeg_sws_scale_frame(sws, f, d.baseAddress!, s.baseAddress!)
            }
        }
        guard rows > 0 else {
            throw DecodeFailure(.decodeError, "\(path): colour conversion failed", path: path, detail: "sws_scale returned \(rows)")
        }
        if !direct { place(into: outputBase) }
    }

    /// Moves the scratch image (packed or planar, scaledWidth × scaledHeight) into the output
    /// frame (TCHW planes or THWC pixels, outputWidth × outputHeight), rotating on the way.
    private func place(into out: UnsafeMutablePointer<UInt8>) {
        let src = scratch.assumingMemoryBound(to: UInt8.self)
        let planeBytes = outputWidth * outputHeight
        let ow = outputWidth, oh = outputHeight, stride = scratchStride
        let planarOut = layout == .tchw
        // Where output channel c of an output pixel goes, relative to the pixel's index i.
        let outChannelStep = planarOut ? planeBytes : 1
        let outPixelStep = planarOut ? 1 : 3
        // Where channel c of scratch pixel (x, y) is.
        let inChannelStep = packedScratch ? 1 : scratchBytes
        let inPixelStep = packedScratch ? 3 : 1

        if rotation == 0 {
            for y in 0..<oh {
                let row = src + y * stride
                let i0 = y * ow
                if packedScratch == !planarOut {
                    // Same arrangement: whole rows (or plane rows) at once.
                    if planarOut {
                        for c in 0..<3 { (out + c * planeBytes + i0).update(from: row + c * scratchBytes, count: ow) }
                    } else {
                        (out + 3 * i0).update(from: row, count: 3 * ow)
                    }
                } else if planarOut {
                    cv_rgb24_to_planes(row, out + i0, out + planeBytes + i0, out + 2 * planeBytes + i0, ow)
                } else {
                    cv_planes_to_rgb24(row, row + scratchBytes, row + 2 * scratchBytes, out + 3 * i0, ow)
                }
            }
            return
        }
        let sw = scaledWidth, sh = scaledHeight
        for y in 0..<oh {
            for x in 0..<ow {
                // The scratch pixel that lands at output (x, y) after a clockwise rotation.
                let (sx, sy): (Int, Int)
                switch rotation {
                case 90: (sx, sy) = (y, sh - 1 - x)
                case 180: (sx, sy) = (sw - 1 - x, sh - 1 - y)
                default: (sx, sy) = (sw - 1 - y, x)  // 270
                }
                let s = src + sy * stride + sx * inPixelStep
                let d = out + (y * ow + x) * outPixelStep
                d[0] = s[0]
                d[outChannelStep] = s[inChannelStep]
                d[2 * outChannelStep] = s[2 * inChannelStep]
            }
        }
    }

    static func isJPEGFormat(_ f: AVPixelFormat) -> Bool {
        f == AV_PIX_FMT_YUVJ420P || f == AV_PIX_FMT_YUVJ422P || f == AV_PIX_FMT_YUVJ444P
            || f == AV_PIX_FMT_YUVJ440P || f == AV_PIX_FMT_YUVJ411P
    }
}
