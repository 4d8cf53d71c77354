import Foundation
import SystemPackage
import Testing

@testable import Shared

/// Builds a block with a small video tensor and a planar audio tensor from deterministic noise.
private func makeBlock(level: Int, frames: Int = 3, samples: Int = 2500, reserve: Int? = nil) throws -> (block: [UInt8], video: [UInt8], audio: [UInt8]) {
    var generator = SplitMix(seed: 42)
    let frameBytes = 3 * 20 * 30
    let video = (0..<(frames * frameBytes)).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
    let audioFloats = (0..<(2 * samples)).map { i in Float(sin(Double(i) * 0.01)) }
    let audio = audioFloats.withUnsafeBytes { Array($0) }

    let fd = try SharedMemory.createSealable(name: "test-block")
    defer { try? fd.close() }
    let writer = try BlockWriter(
        fd: fd, level: level, reservedHeaderBytes: reserve ?? BlockWriter.estimatedHeaderBytes(frames: frames + 6))
    try video.withUnsafeBytes { raw in
        for t in 0..<frames {
            try writer.append(tensor: 0, UnsafeRawBufferPointer(rebasing: raw[(t * frameBytes)..<((t + 1) * frameBytes)]))
        }
    }
    // Planar audio: channel-major, chunks of 1000 samples.
    try audio.withUnsafeBytes { raw in
        for channel in 0..<2 {
            var start = 0
            while start < samples {
                let end = min(samples, start + 1000)
                let base = channel * samples * 4
                try writer.append(tensor: 1, UnsafeRawBufferPointer(rebasing: raw[(base + start * 4)..<(base + end * 4)]))
                start = end
            }
        }
    }
    let size = try writer.finish(
        tensors: [
            BlockTensor(name: "video", dtype: .uint8, shape: [frames, 3, 20, 30], layout: "TCHW", frameSizes: []),
            BlockTensor(name: "audio", dtype: .float32, shape: [2, samples], layout: "CN", frameSizes: []),
        ],
        result: ["path": "/test.mp4", "pts": [0, 0.5, 1.0]])
    try SharedMemory.seal(fd)
    #expect(SharedMemory.isSealed(fd))
    #expect(try SharedMemory.size(of: fd) == size)
    var block = [UInt8](repeating: 0, count: size)
    _ = try block.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: 0, into: $0) }
    return (block, video, audio)
}

/// `zstd -d -c` of `block` (the CLI checks every frame's checksum): its exit status and output.
private func zstdDecompress(_ block: [UInt8]) throws -> (status: Int32, output: [UInt8]) {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cv-block-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    let file = directory.appendingPathComponent("block.zst")
    try Data(block).write(to: file)
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/zstd")
    process.arguments = ["-q", "-d", "-c", file.path]
    let pipe = Pipe()
    process.standardOutput = pipe
    try process.run()
    let output = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, Array(output))
}

struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite struct BlockFormatTests {
    @Test(arguments: [-1000, -5, 1, 3])
    func roundTrip(level: Int) throws {
        let (block, video, audio) = try makeBlock(level: level)
        let (header, tensors) = try block.withUnsafeBytes { try BlockReader.read($0) }
        #expect(header.tensors.map(\.name) == ["video", "audio"])
        #expect(header.tensors[1].frameSizes == [4000, 4000, 2000, 4000, 4000, 2000])
        #expect(header.tensors[0].frameSizes == [1800, 1800, 1800])
        #expect(header.result["path"] == "/test.mp4")
        #expect(tensors[0] == video)
        #expect(tensors[1] == audio)
    }

    @Test func headerLargerThanItsReservationMovesTheData() throws {
        let (block, video, _) = try makeBlock(level: 1, reserve: 40)
        let (_, tensors) = try block.withUnsafeBytes { try BlockReader.read($0) }
        #expect(tensors[0] == video)
    }

    @Test func zstdCommandLineYieldsTheRawTensorBytes() throws {
        let (block, video, audio) = try makeBlock(level: 3)
        let (status, output) = try zstdDecompress(block)
        #expect(status == 0)
        #expect(output == video + audio)
    }

    /// Stored frames (level <= -1000) at the edges of their 128 KiB raw blocks and of XXH64's
    /// 32-byte stripes: the zstd CLI, which verifies every frame's checksum, gives back the bytes.
    @Test func storedFramesOfEverySizeAreReadByZstdItself() throws {
        let sizes = [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 131_071, 131_072, 131_073, 262_144, 300_005]
        var generator = SplitMix(seed: 7)
        let bytes = (0..<sizes.reduce(0, +)).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
        let fd = try SharedMemory.createSealable(name: "test-stored")
        defer { try? fd.close() }
        let writer = try BlockWriter(fd: fd, level: BlockFormat.defaultLevel, reservedHeaderBytes: 4096)
        var start = 0
        try bytes.withUnsafeBytes { raw in
            for size in sizes {
                try writer.append(tensor: 0, UnsafeRawBufferPointer(rebasing: raw[start..<(start + size)]))
                start += size
            }
        }
        let total = try writer.finish(
            tensors: [BlockTensor(name: "audio", dtype: .uint8, shape: [bytes.count], layout: "N", frameSizes: [])],
            result: [:])
        var block = [UInt8](repeating: 0, count: total)
        _ = try block.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: 0, into: $0) }
        let (header, tensors) = try block.withUnsafeBytes { try BlockReader.read($0) }
        #expect(header.tensors[0].frameSizes == sizes)
        #expect(tensors[0] == bytes)

        let (status, output) = try zstdDecompress(block)
        #expect(status == 0, "zstd refused a stored frame (bad XXH64 or header)")
        #expect(output == bytes)
        // Stored: the payload is there as it is, 3 bytes of block header per 128 KiB.
        let overhead = sizes.reduce(0) { $0 + 10 + 3 * max(1, ($1 + 131_071) / 131_072) + 4 }
        #expect(total <= 4096 + bytes.count + overhead + 1024, "\(total) bytes for \(bytes.count) stored")
    }

    /// A writer told the frames' size extends the file ahead (for huge pages) and cuts it at
    /// `finish`: the block is byte for byte the one written without the hint, whether the hint
    /// was right, too large or too small, stored or compressed.
    @Test(arguments: [-1000, 3])
    func theExpectedSizeHintChangesNoByte(level: Int) throws {
        var generator = SplitMix(seed: 11)
        let bytes = (0..<700_000).map { _ in UInt8(truncatingIfNeeded: generator.next() & 0x0F) }
        func write(expected: Int?) throws -> (size: Int, fileSize: Int, block: [UInt8]) {
            let fd = try SharedMemory.createSealable(name: "test-hint")
            defer { try? fd.close() }
            let writer = try BlockWriter(fd: fd, level: level, reservedHeaderBytes: 4096, expectedDataBytes: expected)
            try bytes.withUnsafeBytes { raw in
                for start in stride(from: 0, to: bytes.count, by: 100_000) {
                    try writer.append(tensor: 0, UnsafeRawBufferPointer(rebasing: raw[start..<min(bytes.count, start + 100_000)]))
                }
            }
            let total = try writer.finish(
                tensors: [BlockTensor(name: "audio", dtype: .uint8, shape: [bytes.count], layout: "N", frameSizes: [])],
                result: ["n": 1])
            var block = [UInt8](repeating: 0, count: total)
            _ = try block.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: 0, into: $0) }
            return (total, try SharedMemory.size(of: fd), block)
        }
        let plain = try write(expected: nil)
        #expect(plain.fileSize == plain.size)
        for expected in [bytes.count, 50 * bytes.count, bytes.count / 3] {
            let hinted = try write(expected: expected)
            #expect(hinted.fileSize == hinted.size, "the file must end where the block ends (hint \(expected))")
            #expect(hinted.block == plain.block, "hint \(expected) changed the block")
        }
    }

    /// A block written into a slab (docs/protocol.md, "Block slabs") is byte for byte the block a
    /// fresh memfd gets, in the slab's first bytes, whatever the slab held before; the slab is
    /// never cut. One that outgrows the slab's limit moves to a fresh file with every byte, once,
    /// mid-write or (when the expected size already says so) before writing anything.
    @Test(arguments: [-1000, 3])
    func aBlockInASlabIsTheSameBlockAndMovesOutWhenItOutgrowsIt(level: Int) throws {
        var generator = SplitMix(seed: 12)
        let bytes = (0..<700_000).map { _ in UInt8(truncatingIfNeeded: generator.next() & 0x0F) }
        let tensors = [BlockTensor(name: "audio", dtype: .uint8, shape: [bytes.count], layout: "N", frameSizes: [])]
        func contents(_ fd: FileDescriptor, _ count: Int) throws -> [UInt8] {
            var block = [UInt8](repeating: 0, count: count)
            _ = try block.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: 0, into: $0) }
            return block
        }
        func fill(_ writer: BlockWriter) throws -> Int {
            try bytes.withUnsafeBytes { raw in
                for start in stride(from: 0, to: bytes.count, by: 100_000) {
                    try writer.append(tensor: 0, UnsafeRawBufferPointer(rebasing: raw[start..<min(bytes.count, start + 100_000)]))
                }
            }
            return try writer.finish(tensors: tensors, result: ["n": 1])
        }
        let fresh = try SharedMemory.createSealable(name: "test-fresh")
        defer { try? fresh.close() }
        let plainSize = try fill(try BlockWriter(fd: fresh, level: level, reservedHeaderBytes: 4096))
        let plain = try contents(fresh, plainSize)

        let slab = try SharedMemory.createSealable(name: "test-slab")
        defer { try? slab.close() }
        try SharedMemory.sealAsSlab(slab)
        let garbage = [UInt8](repeating: 0xA5, count: 3_000_000)  // an earlier, larger block
        _ = try garbage.withUnsafeBytes { try slab.writeAll(toAbsoluteOffset: 0, $0) }
        var made: [FileDescriptor] = []
        defer { for fd in made { try? fd.close() } }
        func writeInSlab(limit: Int, expected: Int?, into slab: FileDescriptor) throws -> (writer: BlockWriter, size: Int) {
            let target = BlockWriter.Slab(fd: slab, limit: limit) { () throws(BlockError) -> FileDescriptor in
                do {
                    let fd = try SharedMemory.createSealable(name: "test-overflow")
                    made.append(fd)
                    return fd
                } catch { throw BlockError("\(error)") }
            }
            let writer = try BlockWriter(slab: target, level: level, reservedHeaderBytes: 4096, expectedDataBytes: expected)
            return (writer, try fill(writer))
        }

        let inSlab = try writeInSlab(limit: 64 << 20, expected: bytes.count, into: slab)
        #expect(inSlab.writer.isInSlab && made.isEmpty)
        #expect(inSlab.size == plainSize)
        #expect(try contents(slab, inSlab.size) == plain, "the block in the slab differs from a fresh memfd's")
        #expect(try SharedMemory.size(of: slab) == garbage.count, "a slab is never cut")

        let midWrite = try writeInSlab(limit: 300_000, expected: nil, into: slab)
        #expect(!midWrite.writer.isInSlab && made.count == 1, "the block outgrew the slab and moved")
        #expect(try contents(made[0], midWrite.size) == plain)
        #expect(try SharedMemory.size(of: made[0]) == midWrite.size)

        _ = try garbage.withUnsafeBytes { try slab.writeAll(toAbsoluteOffset: 0, $0) }
        let atOnce = try writeInSlab(limit: 300_000, expected: bytes.count, into: slab)
        #expect(!atOnce.writer.isInSlab && made.count == 2)
        #expect(try contents(made[1], atOnce.size) == plain)
        #expect(try contents(slab, 4096) == Array(garbage[0..<4096]), "a block known not to fit never touches the slab")

        // A new, empty slab: the header space was never written, and a move copies only frames.
        let empty = try SharedMemory.createSealable(name: "test-empty-slab")
        defer { try? empty.close() }
        try SharedMemory.sealAsSlab(empty)
        for expected in [nil, bytes.count] {
            let moved = try writeInSlab(limit: 300_000, expected: expected, into: empty)
            #expect(!moved.writer.isInSlab)
            #expect(try contents(made.last!, moved.size) == plain, "hint \(String(describing: expected))")
        }
    }

    /// Every byte of the block is covered by a check: the header CRC, the zstd frame headers'
    /// CRC, the seek table cross-checks, or a frame's content checksum.
    @Test(arguments: [UInt8(0x01), 0x10, 0x80, 0xFF])
    func everyFlippedByteIsRejected(mask: UInt8) throws {
        // A tight header reservation keeps the block small: the test reads it once per byte.
        let (block, _, _) = try makeBlock(level: -1000, frames: 2, samples: 1200, reserve: 40)
        var accepted: [Int] = []
        for position in block.indices {
            var damaged = block
            damaged[position] ^= mask
            let ok = (try? damaged.withUnsafeBytes { try BlockReader.read($0) }) != nil
            if ok { accepted.append(position) }
        }
        #expect(accepted.isEmpty, "flips accepted at \(accepted.prefix(10)) of \(block.count) bytes")
    }

    @Test func everyTruncationIsRejected() throws {
        let (block, _, _) = try makeBlock(level: 1, frames: 2, samples: 1200, reserve: 40)
        for length in 0..<block.count {
            let cut = Array(block[0..<length])
            #expect((try? cut.withUnsafeBytes { try BlockReader.read($0) }) == nil, "accepted at \(length)")
        }
    }

    @Test func extendedBlockIsRejected() throws {
        let (block, _, _) = try makeBlock(level: 1, frames: 2)
        #expect(throws: BlockError.self) { try (block + [0]).withUnsafeBytes { try BlockReader.read($0) } }
    }
}
