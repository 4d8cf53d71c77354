import CZstd
import SystemPackage

/// The header of a block: its tensors and the decode result it carries.
public struct BlockHeader: Sendable, Equatable {
    public var tensors: [BlockTensor]
    /// CRC32 over the zstd frame headers of all data frames, in order.
    public var frameHeadersCRC32: UInt32
    /// The worker's result metadata (pts, indices, sample fps, source info...).
    public var result: JSONValue
}

/// A block whose structure has been checked: every offset and size is known to be inside the
/// bytes and consistent across the header, the seek table and the zstd frame headers.
public struct BlockLayout: Sendable {
    public struct Frame: Sendable {
        public var offset: Int
        public var compressedSize: Int
        public var decompressedSize: Int
        public var checksum: UInt32
    }

    public var header: BlockHeader
    /// Data frames of each tensor, in order.
    public var frames: [[Frame]]
}

/// Validates and decompresses blocks. Any malformed, truncated or tampered block is rejected
/// with a `BlockError`; no input makes it read out of bounds or trap.
public enum BlockReader {
    /// Checks everything but the frame contents (whose checksums `decompress` verifies).
    public static func validate(_ bytes: UnsafeRawBufferPointer) throws(BlockError) -> BlockLayout {
        let size = bytes.count
        guard size >= BlockFormat.headerPrefixSize + BlockFormat.seekTableFooterSize + 8 else {
            throw BlockError("\(size) bytes is too short for a block")
        }
        // Header frame.
        guard bytes.readLE32(at: 0) == BlockFormat.headerFrameMagic else {
            throw BlockError("no header frame (bad magic number at byte 0)")
        }
        guard let headerPayload = bytes.readLE32(at: 4).map(Int.init),
            headerPayload >= 8, headerPayload <= BlockFormat.maxHeaderBytes, headerPayload + 8 <= size
        else { throw BlockError("header frame size is out of bounds") }
        guard Array(bytes[8..<12]) == BlockFormat.headerPayloadMagic else {
            throw BlockError("header payload magic is not CVB1")
        }
        let headerEnd = 8 + headerPayload
        let json = UnsafeRawBufferPointer(rebasing: bytes[16..<headerEnd])
        guard bytes.readLE32(at: 12) == CRC32.checksum(json) else {
            throw BlockError("header CRC32 mismatch")
        }
        let header = try parseHeader(json)

        // Seek table, read backwards from the footer.
        guard bytes.readLE32(at: size - 4) == BlockFormat.seekableFooterMagic else {
            throw BlockError("no seek table (bad seekable magic at the end)")
        }
        let descriptor = bytes[size - 5]
        guard descriptor == BlockFormat.checksumFlag else {
            throw BlockError("seek table descriptor \(descriptor) is not 0x80 (checksums, no reserved bits)")
        }
        guard let entryCount = bytes.readLE32(at: size - 9).map(Int.init) else {
            throw BlockError("truncated seek table footer")
        }
        let expectedFrames = 1 + header.tensors.reduce(0) { $0 + $1.frameSizes.count }
        guard entryCount == expectedFrames else {
            throw BlockError("seek table lists \(entryCount) frames, header implies \(expectedFrames)")
        }
        let tableFrameSize = entryCount * BlockFormat.seekTableEntrySize + BlockFormat.seekTableFooterSize
        let tableStart = size - tableFrameSize - 8
        guard tableStart >= headerEnd else { throw BlockError("seek table overlaps the header") }
        guard bytes.readLE32(at: tableStart) == BlockFormat.seekTableFrameMagic,
            bytes.readLE32(at: tableStart + 4) == UInt32(tableFrameSize)
        else { throw BlockError("seek table frame header is wrong") }

        func entry(_ i: Int) -> (Int, Int, UInt32) {
            let base = tableStart + 8 + i * BlockFormat.seekTableEntrySize
            return (Int(bytes.readLE32(at: base)!), Int(bytes.readLE32(at: base + 4)!), bytes.readLE32(at: base + 8)!)
        }
        let (headerCompressed, headerDecompressed, headerChecksum) = entry(0)
        guard headerCompressed == headerEnd, headerDecompressed == 0, headerChecksum == 0 else {
            throw BlockError("seek table entry 0 does not describe the header frame")
        }

        var offset = headerEnd
        var index = 1
        var frameHeadersCRC = CRC32()
        var frames: [[BlockLayout.Frame]] = []
        for tensor in header.tensors {
            var list: [BlockLayout.Frame] = []
            list.reserveCapacity(tensor.frameSizes.count)
            for expected in tensor.frameSizes {
                let (compressed, decompressed, checksum) = entry(index)
                guard decompressed == expected else {
                    throw BlockError("frame \(index): seek table says \(decompressed) bytes, header \(expected)")
                }
                guard compressed >= 12, compressed <= tableStart - offset else {
                    throw BlockError("frame \(index): compressed size \(compressed) is out of bounds")
                }
                let frame = UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + compressed)])
                guard frame.readLE32(at: 0) == 0xFD2F_B528 else {
                    throw BlockError("frame \(index): not a zstd frame")
                }
                // Frame_Header_Descriptor bit 2: the frame ends in a content checksum.
                guard frame[4] & 0x04 != 0 else {
                    throw BlockError("frame \(index): has no content checksum")
                }
                guard let frameHeaderSize = BlockFormat.zstdFrameHeaderSize(frame) else {
                    throw BlockError("frame \(index): truncated zstd frame header")
                }
                frameHeadersCRC.update(UnsafeRawBufferPointer(rebasing: frame[0..<frameHeaderSize]))
                let contentSize = ZSTD_getFrameContentSize(frame.baseAddress, frame.count)
                guard contentSize == UInt64(decompressed) else {
                    throw BlockError("frame \(index): content size \(contentSize) differs from the seek table")
                }
                guard ZSTD_findFrameCompressedSize(frame.baseAddress, frame.count) == compressed else {
                    throw BlockError("frame \(index): zstd frame length differs from the seek table")
                }
                guard frame.readLE32(at: compressed - 4) == checksum else {
                    throw BlockError("frame \(index): checksum differs from the seek table")
                }
                list.append(.init(offset: offset, compressedSize: compressed, decompressedSize: decompressed, checksum: checksum))
                offset += compressed
                index += 1
            }
            frames.append(list)
        }
        guard frameHeadersCRC.value == header.frameHeadersCRC32 else {
            throw BlockError("zstd frame headers do not match the header's frame_headers_crc32")
        }
        guard offset == tableStart else {
            throw BlockError("\(tableStart - offset) stray bytes between the last frame and the seek table")
        }
        return BlockLayout(header: header, frames: frames)
    }

    /// Decompresses tensor `tensor` into `destination` (exactly its byte count), verifying every
    /// frame's content checksum.
    public static func decompress(
        _ bytes: UnsafeRawBufferPointer, layout: BlockLayout, tensor: Int,
        into destination: UnsafeMutableRawBufferPointer
    ) throws(BlockError) {
        guard layout.header.tensors.indices.contains(tensor),
            destination.count == layout.header.tensors[tensor].byteCount
        else { throw BlockError("destination does not match tensor \(tensor)") }
        guard let context = ZSTD_createDCtx() else { throw BlockError("out of memory creating a zstd context") }
        defer { ZSTD_freeDCtx(context) }
        var out = 0
        for frame in layout.frames[tensor] {
            guard frame.offset + frame.compressedSize <= bytes.count else {
                throw BlockError("frame beyond the end of the block")
            }
            let n = ZSTD_decompressDCtx(
                context, destination.baseAddress! + out, frame.decompressedSize,
                bytes.baseAddress! + frame.offset, frame.compressedSize)
            if ZSTD_isError(n) != 0 {
                throw BlockError("frame at byte \(frame.offset): \(String(cString: ZSTD_getErrorName(n)))")
            }
            guard n == frame.decompressedSize else { throw BlockError("frame at byte \(frame.offset) is short") }
            out += n
        }
    }

    /// The header alone, read from a block's fd with two preads: the supervisor forwards the
    /// result it carries (it travels once, in the block) without mapping the block. Checks the
    /// magic numbers, the sizes against `blockBytes`, and the header's CRC32; the rest of the
    /// block is for its reader to check.
    public static func header(of fd: FileDescriptor, blockBytes: Int) throws(BlockError) -> BlockHeader {
        var prefix = [UInt8](repeating: 0, count: BlockFormat.headerPrefixSize)
        guard blockBytes >= prefix.count, readFully(fd, into: &prefix, at: 0) else {
            throw BlockError("cannot read the block's header frame")
        }
        let (magic, size, payloadMagic, crc) = prefix.withUnsafeBytes { bytes in
            (bytes.readLE32(at: 0), bytes.readLE32(at: 4).map(Int.init), Array(bytes[8..<12]), bytes.readLE32(at: 12))
        }
        guard magic == BlockFormat.headerFrameMagic else { throw BlockError("no header frame (bad magic number at byte 0)") }
        guard let payload = size, payload >= 8, payload <= BlockFormat.maxHeaderBytes, payload + 8 <= blockBytes else {
            throw BlockError("header frame size is out of bounds")
        }
        guard payloadMagic == BlockFormat.headerPayloadMagic else { throw BlockError("header payload magic is not CVB1") }
        var json = [UInt8](repeating: 0, count: payload - 8)
        guard readFully(fd, into: &json, at: Int64(BlockFormat.headerPrefixSize)) else {
            throw BlockError("cannot read the block's header")
        }
        guard json.withUnsafeBytes({ CRC32.checksum($0) }) == crc else { throw BlockError("header CRC32 mismatch") }
        return try json.withUnsafeBytes { bytes in Result { () throws(BlockError) in try parseHeader(bytes) } }.get()
    }

    private static func readFully(_ fd: FileDescriptor, into buffer: inout [UInt8], at offset: Int64) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = buffer.withUnsafeMutableBytes { raw in
                try? fd.read(fromAbsoluteOffset: offset + Int64(done), into: UnsafeMutableRawBufferPointer(rebasing: raw[done...]))
            }
            guard let n, n > 0 else { return false }
            done += n
        }
        return true
    }

    /// Validates and decompresses every tensor.
    public static func read(_ bytes: UnsafeRawBufferPointer) throws(BlockError) -> (BlockHeader, [[UInt8]]) {
        let layout = try validate(bytes)
        var tensors: [[UInt8]] = []
        for (index, tensor) in layout.header.tensors.enumerated() {
            var data = [UInt8](repeating: 0, count: tensor.byteCount ?? 0)
            try data.withMutableBytes { out throws(BlockError) in
                try decompress(bytes, layout: layout, tensor: index, into: out)
            }
            tensors.append(data)
        }
        return (layout.header, tensors)
    }

    private static func parseHeader(_ json: UnsafeRawBufferPointer) throws(BlockError) -> BlockHeader {
        let value: JSONValue
        do {
            value = try JSONValue.parse(json)
        } catch {
            throw BlockError("header is not JSON: \(error)")
        }
        guard value["format"]?.stringValue == BlockFormat.formatName else {
            throw BlockError("header format is not \(BlockFormat.formatName)")
        }
        guard value["version"]?.intValue == BlockFormat.version else {
            throw BlockError("unsupported block version \(value["version"]?.jsonString ?? "none")")
        }
        guard let tensorsJSON = value["tensors"], let result = value["result"],
            let framesCRC = value["frame_headers_crc32"]?.intValue, framesCRC >= 0, framesCRC <= Int(UInt32.max)
        else { throw BlockError("header lacks 'tensors', 'result' or 'frame_headers_crc32'") }
        let tensors: [BlockTensor]
        do {
            tensors = try JSONCoding.decode([BlockTensor].self, from: tensorsJSON)
        } catch {
            throw BlockError("header tensors are malformed: \(error)")
        }
        var names = Set<String>()
        for tensor in tensors {
            guard names.insert(tensor.name).inserted else { throw BlockError("tensor '\(tensor.name)' twice") }
            guard let total = tensor.byteCount else { throw BlockError("tensor '\(tensor.name)' has a bad shape") }
            guard tensor.frameSizes.allSatisfy({ $0 >= 0 && $0 <= BlockFormat.maxFrameBytes }),
                tensor.frameSizes.reduce(0, +) == total
            else { throw BlockError("tensor '\(tensor.name)': frame sizes do not add up to its shape") }
        }
        return BlockHeader(tensors: tensors, frameHeadersCRC32: UInt32(framesCRC), result: result)
    }
}
