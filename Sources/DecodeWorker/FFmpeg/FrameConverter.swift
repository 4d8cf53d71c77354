import CFFmpeg
import Shared

/// Converts decoded frames to RGB24 at the output size and orientation.
///
/// swscale does colour conversion and resizing in one pass: bicubic (swscale widens the filter
/// when downscaling, which antialiases), accurate rounding, full chroma interpolation, and the
/// frame's own matrix (BT.601/709/2020...) and range (limited/full) via `sws_setColorspaceDetails`.
/// TCHW output is scaled as GBRP so each plane lands in its R/G/B slot; THWC as packed RGB24.
/// swscale writes into an aligned scratch buffer (its SIMD paths may write past a row's end);
/// rows are then copied, or rotated, into the contiguous output frame.
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
    private let scratchStride: Int
    private var scratch: UnsafeMutableRawPointer
    private let scratchBytes: Int
    private let planes: Int

    static let flags = SWS_BICUBIC | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT | SWS_FULL_CHR_H_INP

    var frameBytes: Int { 3 * outputWidth * outputHeight }

    init(width: Int, height: Int, rotation: Int, layout: DecodeOptions.Layout) {
        outputWidth = width
        outputHeight = height
        self.rotation = rotation
        self.layout = layout
        let swapped = rotation == 90 || rotation == 270
        scaledWidth = swapped ? height : width
        scaledHeight = swapped ? width : height
        planes = layout == .tchw ? 3 : 1
        let rowBytes = layout == .tchw ? scaledWidth : 3 * scaledWidth
        scratchStride = (rowBytes + 63) & ~63
        scratchBytes = scratchStride * scaledHeight + 64
        scratch = UnsafeMutableRawPointer.allocate(byteCount: scratchBytes * planes, alignment: 64)
    }

    deinit {
        sws_freeContext(sws)
        scratch.deallocate()
    }

    /// Converts `frame` into `output` (exactly `frameBytes` bytes).
    func convert(_ frame: Frame, into output: UnsafeMutableRawBufferPointer, path: String) throws(DecodeFailure) {
        let f = frame.pointer
        let format = AVPixelFormat(rawValue: f.pointee.format)
        let fullRange = f.pointee.color_range == AVCOL_RANGE_JPEG || Self.isJPEGFormat(format)
        let key: [Int32] = [f.pointee.width, f.pointee.height, f.pointee.format,
                            Int32(f.pointee.colorspace.rawValue), fullRange ? 1 : 0]
        if key != swsKey || sws == nil {
            let dstFormat = layout == .tchw ? AV_PIX_FMT_GBRP : AV_PIX_FMT_RGB24
            sws = sws_getCachedContext(
                sws, f.pointee.width, f.pointee.height, format, Int32(scaledWidth), Int32(scaledHeight),
                dstFormat, Self.flags, nil, nil, nil)
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
        if layout == .tchw {
            // GBRP's planes are G, B, R; scratch planes are kept in R, G, B order.
            dst[0] = base + scratchBytes      // G
            dst[1] = base + 2 * scratchBytes  // B
            dst[2] = base                     // R
            strides = [Int32(scratchStride), Int32(scratchStride), Int32(scratchStride), 0]
        } else {
            dst[0] = base
            strides[0] = Int32(scratchStride)
        }
        let rows = dst.withUnsafeBufferPointer { d in
            strides.withUnsafeBufferPointer { s in
                cffmpeg_sws_scale_frame(sws, f, d.baseAddress!, s.baseAddress!)
            }
        }
        guard rows > 0 else {
            throw DecodeFailure(.decodeError, "\(path): colour conversion failed", path: path, detail: "sws_scale returned \(rows)")
        }
        let out = output.baseAddress!.assumingMemoryBound(to: UInt8.self)
        if layout == .tchw {
            let planeBytes = outputWidth * outputHeight
            for p in 0..<3 {
                place(from: base + p * scratchBytes, pixelBytes: 1, into: out + p * planeBytes)
            }
        } else {
            place(from: base, pixelBytes: 3, into: out)
        }
    }

    /// Copies or rotates one scratch image (scaledWidth × scaledHeight, `pixelBytes` per pixel)
    /// into a contiguous output image (outputWidth × outputHeight).
    private func place(from src: UnsafeMutablePointer<UInt8>, pixelBytes: Int, into dst: UnsafeMutablePointer<UInt8>) {
        let sw = scaledWidth, sh = scaledHeight, ow = outputWidth, oh = outputHeight
        let stride = scratchStride
        switch rotation {
        case 90:
            // out[y][x] = in[sh-1-x][y]
            for y in 0..<oh {
                let row = dst + y * ow * pixelBytes
                for x in 0..<ow {
                    let s = src + (sh - 1 - x) * stride + y * pixelBytes
                    for c in 0..<pixelBytes { row[x * pixelBytes + c] = s[c] }
                }
            }
        case 180:
            for y in 0..<oh {
                let row = dst + y * ow * pixelBytes
                let srcRow = src + (sh - 1 - y) * stride
                for x in 0..<ow {
                    let s = srcRow + (sw - 1 - x) * pixelBytes
                    for c in 0..<pixelBytes { row[x * pixelBytes + c] = s[c] }
                }
            }
        case 270:
            // out[y][x] = in[x][sw-1-y]
            for y in 0..<oh {
                let row = dst + y * ow * pixelBytes
                for x in 0..<ow {
                    let s = src + x * stride + (sw - 1 - y) * pixelBytes
                    for c in 0..<pixelBytes { row[x * pixelBytes + c] = s[c] }
                }
            }
        default:
            let rowBytes = ow * pixelBytes
            for y in 0..<oh {
                (dst + y * rowBytes).update(from: src + y * stride, count: rowBytes)
            }
        }
    }

    static func isJPEGFormat(_ f: AVPixelFormat) -> Bool {
        f == AV_PIX_FMT_YUVJ420P || f == AV_PIX_FMT_YUVJ422P || f == AV_PIX_FMT_YUVJ444P
            || f == AV_PIX_FMT_YUVJ440P || f == AV_PIX_FMT_YUVJ411P
    }
}
