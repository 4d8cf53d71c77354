import Shared
import Testing

@testable import DecodeWorker

/// Qwen2.5-VL rules (qwen-vl-utils 0.0.11). Expected values were computed independently with
/// Python's own `round`, `math.floor/ceil` and qwen's formulas, or are derived below with exact
/// integer arithmetic.
@Suite struct SamplingTests {
    struct RateCase: Sendable, CustomTestStringConvertible {
        var total: Int, fps: Double, rate: Double = 2, minFrames = 4, maxFrames = 768, expected: Int
        var testDescription: String { "total \(total) @ \(fps) fps, rate \(rate) → \(expected)" }
    }

    @Test(arguments: [
        RateCase(total: 300, fps: 30, expected: 20),
        RateCase(total: 82, fps: 60, expected: 4),  // 2.73 → raised to min_frames
        RateCase(total: 50, fps: 10, expected: 10),
        RateCase(total: 5, fps: 25, expected: 4),  // min 4 ≤ total 5, floor to factor
        RateCase(total: 3, fps: 30, expected: 2),  // min_frames 4 > total: bounded by total, floored
        RateCase(total: 1000, fps: 29.97, expected: 66),
        RateCase(total: 9000, fps: 30, expected: 600),
        RateCase(total: 25, fps: 10.505, expected: 4),
        RateCase(total: 321, fps: 30.303, expected: 20),
        RateCase(total: 7, fps: 30, expected: 4),
        RateCase(total: 300, fps: 30, rate: 0.5, expected: 4),
        RateCase(total: 300, fps: 30, maxFrames: 10, expected: 10),
        RateCase(total: 300, fps: 30, rate: 0.1, minFrames: 9, expected: 10),  // ceil(9) to factor
        RateCase(total: 1, fps: 30, expected: 0),  // refused by the caller (fewer than 2)
    ])
    func framesForRate(_ c: RateCase) {
        #expect(
            Sampling.framesForRate(
                total: c.total, avgFps: c.fps, fps: c.rate, minFrames: c.minFrames, maxFrames: c.maxFrames, factor: 2)
                == c.expected)
    }

    /// round_by_factor(N, 2) = round(N / 2) × 2 with ties to even: 1 → 0, 3 → 4, 5 → 4, 7 → 8.
    @Test(arguments: [(1, 0), (2, 2), (3, 4), (5, 4), (7, 8), (9, 8), (10, 10), (11, 12)])
    func framesForCount(_ n: Int, _ expected: Int) {
        #expect(Sampling.framesForCount(n, factor: 2) == expected)
    }

    @Test func pythonRoundIsHalfEven() {
        #expect(Sampling.pythonRound(0.5) == 0)
        #expect(Sampling.pythonRound(1.5) == 2)
        #expect(Sampling.pythonRound(2.5) == 2)
        #expect(Sampling.pythonRound(-0.5) == 0)
        #expect(Sampling.roundByFactor(42, 28) == 56)  // 1.5 → 2
        #expect(Sampling.roundByFactor(70, 28) == 56)  // 2.5 → 2
    }

    /// Exact ties round half to even: linspace(0, 5, 3) = [0, 2.5, 5] → [0, 2, 5];
    /// linspace(11, 16, 3) = [11, 13.5, 16] → [11, 14, 16].
    @Test func linspaceTies() {
        #expect(Sampling.linspaceIndices(first: 0, last: 5, count: 3) == [0, 2, 5])
        #expect(Sampling.linspaceIndices(first: 11, last: 16, count: 3) == [11, 14, 16])
        #expect(Sampling.linspaceIndices(first: 0, last: 81, count: 4) == [0, 27, 54, 81])
        #expect(Sampling.linspaceIndices(first: 0, last: 1, count: 4) == [0, 0, 1, 1])
        #expect(Sampling.linspaceIndices(first: 7, last: 7, count: 1) == [7])
    }

    /// A sweep against exact rational linspace with half-even rounding, skipping only ties whose
    /// step is not a power-of-two fraction (there float32 rounding decides, as in torch).
    @Test func linspaceSweep() {
        for first in [0, 3, 10] {
            for length in [1, 2, 5, 9, 29, 99, 299, 1699] {
                for count in [2, 3, 4, 6, 8, 16, 20, 66] where count <= length + 1 {
                    let got = Sampling.linspaceIndices(first: first, last: first + length, count: count)
                    #expect(got.count == count)
                    let d = count - 1
                    let dyadic = d & (d - 1) == 0
                    for i in 0..<count {
                        let numerator = length * i  // value = first + numerator / d
                        let q = numerator / d, r = numerator % d
                        let expected: Int
                        if 2 * r < d { expected = q } else if 2 * r > d { expected = q + 1 } else {
                            if !dyadic { continue }
                            expected = q % 2 == 0 ? q : q + 1
                        }
                        // first is an integer, so ties of first + x round like x when first is even.
                        if 2 * r == d, first % 2 != 0 { continue }
                        #expect(got[i] == first + expected, "linspace(\(first), \(first + length), \(count))[\(i)]")
                    }
                }
            }
        }
    }

    /// Long clips, where float32 rounding decides: torch's CPU kernel computes `first + step·i`
    /// (and `last − step·(count−1−i)`) as one fused multiply-add. The reference here does the
    /// same arithmetic exactly in Double (exact for these magnitudes) and rounds once to Float.
    /// 768 of 11 547 frames is a case where two roundings pick 9152 and torch picks 9153.
    @Test func linspaceMatchesTorchsFusedArithmeticOnLongClips() {
        #expect(Sampling.linspaceIndices(first: 0, last: 11_546, count: 768).contains(9153))
        for (last, count) in [(11_546, 768), (25_000, 768), (107_999, 768), (260_000, 512), (54_321, 100)] {
            let start = Float(0), end = Float(last)
            let step = (end - start) / Float(count - 1)
            let expected = (0..<count).map { i -> Int in
                let exact = i < count / 2
                    ? Double(start) + Double(step) * Double(i)
                    : Double(end) - Double(step) * Double(count - 1 - i)
                return Int(Float(exact).rounded(.toNearestOrEven))
            }
            #expect(Sampling.linspaceIndices(first: 0, last: last, count: count) == expected, "linspace(0, \(last), \(count))")
        }
    }

    struct ResizeCase: Sendable, CustomTestStringConvertible {
        var height: Int, width: Int, frames: Int, maxPixels: Int?, totalPixels: Int?, expected: (Int, Int)
        var testDescription: String { "\(width)x\(height) n=\(frames) max \(maxPixels.map(String.init) ?? "-")" }
    }

    @Test(arguments: [
        ResizeCase(height: 720, width: 1280, frames: 8, maxPixels: 448 * 448, totalPixels: nil, expected: (336, 588)),
        ResizeCase(height: 1080, width: 1920, frames: 768, maxPixels: nil, totalPixels: nil, expected: (336, 644)),
        ResizeCase(height: 50, width: 66, frames: 4, maxPixels: 200_704, totalPixels: nil, expected: (280, 364)),
        ResizeCase(height: 568, width: 320, frames: 2, maxPixels: nil, totalPixels: nil, expected: (560, 308)),
        ResizeCase(height: 100, width: 178, frames: 16, maxPixels: 200_704, totalPixels: nil, expected: (252, 448)),
        ResizeCase(height: 1080, width: 1920, frames: 60, maxPixels: nil, totalPixels: 24576 * 28 * 28, expected: (560, 1008)),
        ResizeCase(height: 144, width: 176, frames: 2, maxPixels: 100_000, totalPixels: nil, expected: (308, 364)),
    ])
    func smartResize(_ c: ResizeCase) {
        let bounds = Sampling.videoPixelBounds(
            frames: c.frames, minPixels: nil, maxPixels: c.maxPixels, totalPixels: c.totalPixels)
        let size = Sampling.smartResize(
            height: c.height, width: c.width, factor: 28, minPixels: bounds.min, maxPixels: bounds.max)
        #expect(size?.height == c.expected.0)
        #expect(size?.width == c.expected.1)
    }

    @Test func qwenConstants() {
        #expect(Sampling.videoTotalPixels == 90_316_800)
        #expect(Sampling.smartResize(height: 10, width: 2500, factor: 28, minPixels: 1, maxPixels: 1e9) == nil)
    }

    /// Selection over a synthetic table: [start, end) by time, Qwen's n, linspace over the range.
    @Test func selectionOverRange() throws {
        var table = FrameTable()
        table.timeBase = .init(num: 1, den: 30)
        for i in 0..<300 {
            let t = Int64(i)
            table.packets.append(
                FrameTable.PacketInfo(pts: t, dts: t, position: t, duration: 1, isKey: i % 30 == 0, hidden: false))
        }
        table.finish(stream: nil)
        table.avgFps = 30
        var options = DecodeOptions()
        options.start = 2
        options.end = 6
        let plan = try ClipDecoder.select(table: table, options: options, path: "t")
        #expect(plan.framesInRange == 120)
        #expect(plan.outputs == Sampling.linspaceIndices(first: 60, last: 179, count: 8))
        #expect(plan.sampleFps == 2)
        options.selection = .timestamps([0, 1.01, 9.99, 1.01])
        options.start = nil
        options.end = nil
        #expect(try ClipDecoder.select(table: table, options: options, path: "t").outputs == [0, 30, 299, 30])
        options.selection = .timestamps([10.0])
        #expect(throws: DecodeFailure.self) { try ClipDecoder.select(table: table, options: options, path: "t") }
        options.selection = .count(1)
        let error = #expect(throws: DecodeFailure.self) { try ClipDecoder.select(table: table, options: options, path: "clip.mp4") }
        #expect(error?.reason == .invalidRequest)
        #expect(error?.message.contains("clip.mp4") == true)
    }
}
