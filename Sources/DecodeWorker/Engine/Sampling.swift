/// The frame-count and resize rules of Qwen2.5-VL (qwen-vl-utils 0.0.11, `vision_process.py`),
/// reproduced with Python's numeric semantics: `round()` rounds half to even, divisions are in
/// double precision, and frame indices come from `torch.linspace(...).round()` in float32.
enum Sampling {
    /// Qwen's video pixel constants (pixels, independent of `factor`).
    static let videoMinPixels = 128 * 28 * 28
    static let videoMaxPixels = 768 * 28 * 28
    /// `VIDEO_TOTAL_PIXELS` = int(float(128000 * 28 * 28 * 0.9)).
    static let videoTotalPixels = Int((128_000.0 * 28 * 28 * 0.9).rounded(.towardZero))
    /// smart_resize refuses aspect ratios beyond this.
    static let maxRatio = 200.0

    /// Python 3 `round(x)`: to the nearest integer, ties to even.
    static func pythonRound(_ x: Double) -> Double { x.rounded(.toNearestOrEven) }

    /// `round_by_factor`: the multiple of `factor` closest to `number` (ties to even quotient).
    static func roundByFactor(_ number: Double, _ factor: Int) -> Int {
        Int(pythonRound(number / Double(factor))) * factor
    }

    /// `ceil_by_factor`.
    static func ceilByFactor(_ number: Double, _ factor: Int) -> Int {
        Int((number / Double(factor)).rounded(.up)) * factor
    }

    /// `floor_by_factor`.
    static func floorByFactor(_ number: Double, _ factor: Int) -> Int {
        Int((number / Double(factor)).rounded(.down)) * factor
    }

    /// `smart_nframes` for the `fps` mode: n = floor_by_factor(min(clamp(total / avgFps × fps,
    /// ceil_by_factor(minFrames), floor_by_factor(maxFrames)), total)). Qwen's default
    /// `max_frames` is min(768, total); bounding by `total` afterwards gives the same n.
    static func framesForRate(
        total: Int, avgFps: Double, fps: Double, minFrames: Int, maxFrames: Int, factor: Int
    ) -> Int {
        let lower = Double(ceilByFactor(Double(minFrames), factor))
        let upper = Double(floorByFactor(Double(maxFrames), factor))
        var n = Double(total) / avgFps * fps
        n = min(min(max(n, lower), upper), Double(total))
        return floorByFactor(n, factor)
    }

    /// `smart_nframes` for the `nframes` mode.
    static func framesForCount(_ requested: Int, factor: Int) -> Int {
        roundByFactor(Double(requested), factor)
    }

    /// `torch.linspace(first, last, count).round()` (float32, CPU): the first half counts up from
    /// `first`, the second half down from `last`, each as one fused multiply-add (torch's vector
    /// kernels are built with FMA: one rounding, not two — on clips of ~10 000 frames and more the
    /// difference moves an index by one), then each value rounds half to even.
    static func linspaceIndices(first: Int, last: Int, count: Int) -> [Int] {
        guard count > 0 else { return [] }
        if count == 1 { return [first] }
        let start = Float(first), end = Float(last)
        let step = (end - start) / Float(count - 1)
        let halfway = count / 2
        return (0..<count).map { i in
            let value: Float =
                i < halfway ? start.addingProduct(step, Float(i)) : end.addingProduct(-step, Float(count - i - 1))
            return Int(value.rounded(.toNearestOrEven))
        }
    }

    /// Qwen's per-video pixel bounds: max_pixels = max(min(768·28², total_pixels / n × 2),
    /// int(min_pixels × 1.05)), then at most the requested `max_pixels`.
    static func videoPixelBounds(
        frames n: Int, minPixels: Int?, maxPixels: Int?, totalPixels: Int?, frameFactor: Int = 2
    ) -> (min: Double, max: Double) {
        let minP = Double(minPixels ?? videoMinPixels)
        let total = Double(totalPixels ?? videoTotalPixels)
        var maxP = max(min(Double(videoMaxPixels), total / Double(max(n, 1)) * Double(frameFactor)),
                       (minP * 1.05).rounded(.towardZero))
        if let maxPixels { maxP = min(Double(maxPixels), maxP) }
        return (minP, maxP)
    }

    /// `smart_resize`: both sides multiples of `factor`, pixels within [minPixels, maxPixels],
    /// aspect ratio kept as closely as possible. Returns nil for an aspect ratio above 200.
    /// Unlike 0.0.11 (which can return 0 for extreme shapes), a side is never below `factor`.
    static func smartResize(
        height: Int, width: Int, factor: Int, minPixels: Double, maxPixels: Double
    ) -> (height: Int, width: Int)? {
        let h = Double(height), w = Double(width)
        guard height > 0, width > 0, max(h, w) / min(h, w) <= maxRatio else { return nil }
        var hBar = max(factor, roundByFactor(h, factor))
        var wBar = max(factor, roundByFactor(w, factor))
        if Double(hBar * wBar) > maxPixels {
            let beta = ((h * w) / maxPixels).squareRoot()
            hBar = max(factor, floorByFactor(h / beta, factor))
            wBar = max(factor, floorByFactor(w / beta, factor))
        } else if Double(hBar * wBar) < minPixels {
            let beta = (minPixels / (h * w)).squareRoot()
            hBar = ceilByFactor(h * beta, factor)
            wBar = ceilByFactor(w * beta, factor)
        }
        return (hBar, wBar)
    }
}
