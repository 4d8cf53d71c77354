import Foundation
import Shared
import Testing

@testable import DecodeWorker

/// Audio helpers: decode to planar float arrays, references from the ffmpeg CLI, error measures.
enum AudioSupport {
    struct Decoded {
        var result: DecodeResult
        var header: BlockHeader
        /// `[channel][sample]`.
        var planes: [[Float]]
        var video: [UInt8]?
    }

    /// Decodes in process and returns the result, the block header and the audio planes.
    static func decode(_ path: String, _ options: DecodeOptions, access: AccessPolicy = .auto) throws(DecodeFailure) -> Decoded {
        let clip = try Support.withEngine { () throws(DecodeFailure) in
            try ClipDecoder.decode(ClipRequest(path: path, displayPath: path, options: options, access: access))
        }
        do {
            #expect(SharedMemory.isSealed(clip.block!.fd!))
            let mapped = try MappedFile(fd: clip.block!.fd!)
            let (header, tensors) = try BlockReader.read(mapped.bytes)
            var planes: [[Float]] = []
            var video: [UInt8]? = nil
            for (tensor, bytes) in zip(header.tensors, tensors) {
                if tensor.name == "video" { video = bytes }
                guard tensor.name == "audio" else { continue }
                let channels = tensor.shape[0], samples = tensor.shape[1]
                let floats = bytes.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
                planes = (0..<channels).map { c in Array(floats[(c * samples)..<((c + 1) * samples)]) }
            }
            return Decoded(result: clip.result, header: header, planes: planes, video: video)
        } catch {
            throw DecodeFailure(.decodeError, "test: invalid block: \(error)", path: path)
        }
    }

    static func options(rate: Int = 16_000, channels: Int = 1, video: Bool = false) -> DecodeOptions {
        var o = DecodeOptions()
        o.audio = true
        o.video = video
        o.sampleRate = rate
        o.channels = channels
        o.level = 1
        return o
    }

    /// `ffmpeg -i F -map 0:INDEX [-af AF] -ar R -ac C -f f32le -`, deinterleaved.
    static func ffmpegAudio(
        _ path: String, stream: Int, rate: Int, channels: Int, filter: String? = nil
    ) throws -> [[Float]] {
        var args = ["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-map", "0:\(stream)"]
        if let filter { args += ["-af", filter] }
        let out = NSTemporaryDirectory() + "clipvisor-audio-ref-\(UUID().uuidString).f32"
        defer { try? FileManager.default.removeItem(atPath: out) }
        args += ["-ar", "\(rate)", "-ac", "\(channels)", "-f", "f32le", "-y", out]
        let r = try Support.run(args, timeout: 120)
        guard r.status == 0 else { throw Support.FixtureError(message: "ffmpeg reference: \(r.stderr)") }
        let data = try Data(contentsOf: URL(fileURLWithPath: out))
        let floats = data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        let n = floats.count / channels
        return (0..<channels).map { c in (0..<n).map { floats[$0 * channels + c] } }
    }

    /// ‖a − b‖ / ‖b‖ over all channels (the absolute RMS difference when b is silent).
    static func relativeRMS(_ a: [[Float]], _ b: [[Float]]) -> Double {
        var diff = 0.0, norm = 0.0, count = 0
        for (x, y) in zip(a, b) {
            for (p, q) in zip(x, y) {
                let d = Double(p) - Double(q)
                diff += d * d
                norm += Double(q) * Double(q)
                count += 1
            }
        }
        guard count > 0 else { return 0 }
        return norm > 0 ? (diff / norm).squareRoot() : (diff / Double(count)).squareRoot()
    }

    /// Index of the first sample whose magnitude reaches `fraction` of the peak.
    static func onset(_ samples: [Float], fraction: Float = 0.3) -> Int? {
        let peak = samples.map(abs).max() ?? 0
        guard peak > 0 else { return nil }
        return samples.firstIndex { abs($0) >= fraction * peak }
    }
}
