import Foundation
import Shared
import Testing

@testable import DecodeWorker

/// Shared helpers: paths, subprocesses with a timeout, fixtures made with the ffmpeg CLI, blocks.
enum Support {
    /// The shared corpus: `$CLIPVISOR_CORPUS`, else `../shared/corpus/real` beside the
    /// repository, else the workplace's `/work/shared/corpus/real`.
    static let corpus: String = {
        if let explicit = ProcessInfo.processInfo.environment["CLIPVISOR_CORPUS"] { return explicit }
        let beside = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("shared/corpus/real").path
        if FileManager.default.fileExists(atPath: beside + "/MANIFEST.tsv") { return beside }
        return "/work/shared/corpus/real"
    }()

    /// Whether the corpus is there; tests that need it require it.
    static var hasCorpus: Bool { FileManager.default.fileExists(atPath: corpus + "/MANIFEST.tsv") }

    static func corpusFile(_ name: String) -> String { corpus + "/" + name }

    /// The built worker executable, next to the test bundle.
    static let worker: String = {
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("clipvisor-worker").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent(".build/debug/clipvisor-worker").path
    }()

    /// One manifest row: file name and the columns by header name.
    static func manifest() -> [[String: String]] {
        guard let text = try? String(contentsOfFile: corpus + "/MANIFEST.tsv", encoding: .utf8) else { return [] }
        let lines = text.split(separator: "\n").map { $0.split(separator: "\t", omittingEmptySubsequences: false).map(String.init) }
        guard let header = lines.first else { return [] }
        return lines.dropFirst().map { Dictionary(uniqueKeysWithValues: zip(header, $0)) }
    }

    struct ProcessResult {
        var status: Int32
        var signal: Int32?
        var timedOut: Bool
        var stdout: String
        var stderr: String
    }

    /// Runs a program with a wall-clock limit (SIGKILL after `timeout` seconds).
    static func run(_ arguments: [String], timeout: Double = 60, environment: [String: String]? = nil) throws -> ProcessResult {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: arguments[0].hasPrefix("/") ? arguments[0] : "/usr/bin/env")
        process.arguments = arguments[0].hasPrefix("/") ? Array(arguments.dropFirst()) : arguments
        if let environment { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        // Drain pipes concurrently so a chatty child cannot block on a full pipe.
        let outData = Locked(Data()), errData = Locked(Data())
        let group = DispatchGroup()
        group.enter()
        DispatchQueue.global().async { outData.set(out.fileHandleForReading.readDataToEndOfFile()); group.leave() }
        group.enter()
        DispatchQueue.global().async { errData.set(err.fileHandleForReading.readDataToEndOfFile()); group.leave() }
        let deadline = Date().addingTimeInterval(timeout)
        var timedOut = false
        while process.isRunning {
            if Date() > deadline {
                timedOut = true
                kill(process.processIdentifier, SIGKILL)
                break
            }
            usleep(5_000)
        }
        process.waitUntilExit()
        group.wait()
        let signaled = process.terminationReason == .uncaughtSignal
        return ProcessResult(
            status: process.terminationStatus, signal: signaled ? process.terminationStatus : nil, timedOut: timedOut,
            stdout: String(decoding: outData.get(), as: UTF8.self), stderr: String(decoding: errData.get(), as: UTF8.self))
    }

    /// A fresh temporary directory, removed by the caller.
    static func temporaryDirectory() throws -> String {
        let path = NSTemporaryDirectory() + "clipvisor-engine-tests-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    /// Makes a clip with the ffmpeg CLI (fixtures are generated, never committed).
    static func ffmpeg(_ arguments: [String]) throws {
        let result = try run(["ffmpeg", "-nostdin", "-v", "error", "-y"] + arguments, timeout: 120)
        guard result.status == 0, !result.timedOut else {
            throw FixtureError(message: "ffmpeg \(arguments.joined(separator: " ")): \(result.stderr)")
        }
    }

    struct FixtureError: Error, CustomStringConvertible {
        var message: String
        var description: String { message }
    }

    /// FFmpeg's log capture (`FFLog`) is process-global and reset per clip, which is right for the
    /// single-threaded worker; test suites run in parallel, so every in-process engine call (decode,
    /// probe) takes this lock, or one clip's FFmpeg errors would land in another's result.
    static let engineLock = NSLock()

    static func withEngine<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        engineLock.lock()
        defer { engineLock.unlock() }
        return try body()
    }

    /// `Prober.probe` under the engine lock.
    static func probe(_ path: String) throws(DecodeFailure) -> JSONValue {
        try withEngine { () throws(DecodeFailure) in try Prober.probe(path: path, displayPath: path) }
    }

    /// Decodes in process and returns the result and the raw tensor bytes.
    static func decode(
        _ path: String, _ options: DecodeOptions = DecodeOptions(), access: AccessPolicy = .auto, threadBudget: Int = 1
    ) throws(DecodeFailure) -> (DecodeResult, [UInt8]) {
        let clip = try withEngine { () throws(DecodeFailure) in
            try ClipDecoder.decode(ClipRequest(path: path, displayPath: path, options: options, access: access, threadBudget: threadBudget))
        }
        do {
            return (clip.result, try readBlock(clip.block!.fd!))
        } catch {
            throw DecodeFailure(.decodeError, "test: invalid block: \(error)", path: path)
        }
    }

    /// Validates a block (its seals too) and returns the first tensor's raw bytes.
    static func readBlock(_ fd: FileDescriptorLike) throws -> [UInt8] {
        #expect(SharedMemory.isSealed(fd))
        let mapped = try MappedFile(fd: fd)
        let (_, tensors) = try BlockReader.read(mapped.bytes)
        return tensors.first ?? []
    }

    /// RGB24 frames of `path` from the ffmpeg CLI at native size (`vf` selects and scales).
    static func ffmpegFrames(_ path: String, vf: String, extra: [String] = []) throws -> [UInt8] {
        let out = NSTemporaryDirectory() + "clipvisor-ref-\(UUID().uuidString).rgb"
        defer { try? FileManager.default.removeItem(atPath: out) }
        try ffmpeg(extra + ["-i", path, "-vf", vf, "-vsync", "0", "-f", "rawvideo", "-pix_fmt", "rgb24", out])
        return Array(try Data(contentsOf: URL(fileURLWithPath: out)))
    }

    /// The scaler flags the worker uses when it resizes, for ffmpeg references that must match
    /// it bit for bit (FrameConverter.resizeFlags).
    static let swsFlags = "bicubic+accurate_rnd+full_chroma_int+full_chroma_inp"
    /// The flags of its native-size path (FrameConverter.nativeFlags).
    static let swsNativeFlags = "bicubic+full_chroma_inp"

    /// PSNR in dB between two equal-size byte arrays (∞ when identical).
    static func psnr(_ a: ArraySlice<UInt8>, _ b: ArraySlice<UInt8>) -> Double {
        precondition(a.count == b.count)
        var sum = 0.0
        for (x, y) in zip(a, b) {
            let d = Double(x) - Double(y)
            sum += d * d
        }
        if sum == 0 { return .infinity }
        return 10 * log10(255 * 255 / (sum / Double(a.count)))
    }

    /// TCHW frame → HWC bytes.
    static func planarToPacked(_ frame: ArraySlice<UInt8>, width: Int, height: Int) -> [UInt8] {
        let plane = width * height
        let base = frame.startIndex
        var out = [UInt8](repeating: 0, count: 3 * plane)
        for i in 0..<plane {
            out[3 * i] = frame[base + i]
            out[3 * i + 1] = frame[base + plane + i]
            out[3 * i + 2] = frame[base + 2 * plane + i]
        }
        return out
    }

    /// ffprobe's presentation times (pts, else its best-effort guess) of every decoded frame of
    /// the first video stream, sorted.
    static func ffprobeFrameTimes(_ path: String) throws -> [Double] {
        let r = try run([
            "ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time,best_effort_timestamp_time",
            "-of", "csv=p=0", path,
        ])
        return r.stdout.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: ",", omittingEmptySubsequences: false).map { String($0).trimmingCharacters(in: .whitespaces) }
            return fields.lazy.compactMap { Double($0) }.first
        }.sorted()
    }
}

typealias FileDescriptorLike = SystemPackageFD

/// A tiny lock box for values written by another thread.
final class Locked<T>: @unchecked Sendable {  // guarded by `lock`
    private var value: T
    private let lock = NSLock()
    init(_ value: T) { self.value = value }
    func set(_ v: T) { lock.lock(); value = v; lock.unlock() }
    func get() -> T { lock.lock(); defer { lock.unlock() }; return value }
}
