import CStoredFrame
import CZstd
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Writes one block into a file descriptor — the worker's memfd, or a cache file.
///
/// Frames are written with positional writes as they are produced, behind space reserved for
/// the header (whose pts lists are known only at the end). The writer never maps the file, so
/// the memfd can be sealed against writing afterwards (F_SEAL_WRITE fails while a writable
/// mapping exists), and output is never held twice in memory.
public final class BlockWriter {
    private let fd: FileDescriptor
    /// The zstd context; nil when frames are stored (`BlockFormat.storesFrames(level:)`).
    private let context: OpaquePointer?
    private var scratch: [UInt8] = []
    private let reservedHeaderBytes: Int
    private var position: Int
    private var entries: [SeekEntry] = []
    private var frameTensors: [Int] = []
    private var frameHeadersCRC = CRC32()
    /// The file was extended to the expected size before any frame (`expectedDataBytes`), so
    /// `finish` cuts it to the block's real end.
    private var extendedAhead = false

    struct SeekEntry {
        var compressed: Int
        var decompressed: Int
        var checksum: UInt32
    }

    /// - Parameters:
    ///   - reservedHeaderBytes: space kept free for the header frame; `estimatedHeaderBytes`
    ///     gives a good value. A larger header still works, at the cost of moving the data once.
    ///   - expectedDataBytes: the frames' uncompressed bytes, when known. The file is then
    ///     extended to about the block's size before the first frame (sparse: nothing is
    ///     allocated), so that where the host lets shared memory use transparent huge pages
    ///     (`shmem_enabled = within_size`, docs/operations.md) the frames land in 2 MiB pages:
    ///     a 4 KiB page is counted, mapped and freed separately by the worker's writes, the
    ///     client's mapping and the last close, which on a VM costs more than the copy.
    public init(fd: FileDescriptor, level: Int, reservedHeaderBytes: Int, expectedDataBytes: Int? = nil) throws(BlockError) {
        self.fd = fd
        self.reservedHeaderBytes = max(reservedHeaderBytes, BlockFormat.headerPrefixSize + 64)
        self.position = self.reservedHeaderBytes
        if let expectedDataBytes, expectedDataBytes > 0 {
            // Frame headers, raw-block headers and checksums, the seek table: well under 1 %.
            let size = self.reservedHeaderBytes + expectedDataBytes + expectedDataBytes / 64 + 65_536
            guard ftruncate(fd.rawValue, off_t(size)) == 0 else {
                throw BlockError("extending the block to \(size) bytes: \(Errno(rawValue: errno))")
            }
            extendedAhead = true
        }
        guard !BlockFormat.storesFrames(level: level) else {
            context = nil
            return
        }
        guard let context = ZSTD_createCCtx() else { throw BlockError("out of memory creating a zstd context") }
        self.context = context
        try check(ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, Int32(level)), "level \(level)")
        try check(ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 1), "checksum flag")
        try check(ZSTD_CCtx_setParameter(context, ZSTD_c_contentSizeFlag, 1), "content size flag")
    }

    deinit { if let context { ZSTD_freeCCtx(context) } }

    /// A generous bound on the header of a block with this many frames (pts, indices and sizes
    /// take well under 64 bytes a frame in JSON).
    public static func estimatedHeaderBytes(frames: Int) -> Int { 8192 + 64 * frames }

    /// Bytes written so far, data frames included.
    public var bytesWritten: Int { position }

    /// Compresses `bytes` as the next data frame of tensor `tensor`. Frames of a tensor are
    /// consecutive, and tensors come in the order `finish` lists them.
    public func append(tensor: Int, _ bytes: UnsafeRawBufferPointer) throws(BlockError) {
        if let last = frameTensors.last, tensor < last {
            throw BlockError("frames of tensor \(tensor) after tensor \(last)")
        }
        guard let context else {
            try appendStored(tensor: tensor, bytes)
            return
        }
        let bound = ZSTD_compressBound(bytes.count)
        if scratch.count < bound { scratch = [UInt8](repeating: 0, count: bound) }
        let written = scratch.withUnsafeMutableBytes { out in
            ZSTD_compress2(context, out.baseAddress, out.count, bytes.baseAddress, bytes.count)
        }
        try check(written, "compressing a frame")
        let checksum = scratch.withUnsafeBytes { $0.readLE32(at: written - 4) } ?? 0
        scratch.withUnsafeBytes { out in
            let frame = UnsafeRawBufferPointer(rebasing: out[0..<written])
            if let headerSize = BlockFormat.zstdFrameHeaderSize(frame) {
                frameHeadersCRC.update(UnsafeRawBufferPointer(rebasing: frame[0..<headerSize]))
            }
        }
        try scratch.withBytes { out throws(BlockError) in
            try writeAll(UnsafeRawBufferPointer(rebasing: out[0..<written]), at: position)
        }
        entries.append(SeekEntry(compressed: written, decompressed: bytes.count, checksum: checksum))
        frameTensors.append(tensor)
        position += written
    }

    /// A stored frame, written from `bytes` with no copy (CStoredFrame).
    private func appendStored(tensor: Int, _ bytes: UnsafeRawBufferPointer) throws(BlockError) {
        var checksum: UInt32 = 0
        var header = [UInt8](repeating: 0, count: Int(CV_STORED_FRAME_MAX_HEADER))
        var headerBytes = 0
        let written = cv_write_stored_zstd_frame(
            fd.rawValue, Int64(position), bytes.baseAddress, bytes.count, &checksum, &header, &headerBytes)
        guard written >= 0 else {
            let errno = Errno(rawValue: Glibc.errno)
            throw BlockError("writing the block: \(errno) (errno \(errno.rawValue))")
        }
        header.withUnsafeBytes { frameHeadersCRC.update(UnsafeRawBufferPointer(rebasing: $0[0..<headerBytes])) }
        entries.append(SeekEntry(compressed: Int(written), decompressed: bytes.count, checksum: checksum))
        frameTensors.append(tensor)
        position += Int(written)
    }

    /// Writes the header and the seek table; returns the block's total size.
    /// `tensors[i].frameSizes` is filled in from the frames appended for tensor `i`.
    @discardableResult
    public func finish(tensors: [BlockTensor], result: JSONValue) throws(BlockError) -> Int {
        var described = tensors
        for index in described.indices { described[index].frameSizes = [] }
        for (entry, tensor) in zip(entries, frameTensors) {
            guard described.indices.contains(tensor) else { throw BlockError("frame for unknown tensor \(tensor)") }
            described[tensor].frameSizes.append(entry.decompressed)
        }
        for tensor in described {
            guard tensor.byteCount == tensor.frameSizes.reduce(0, +) else {
                throw BlockError(
                    "tensor '\(tensor.name)' of shape \(tensor.shape) got \(tensor.frameSizes.reduce(0, +)) bytes of frames")
            }
        }
        let header: JSONValue = [
            "format": .string(BlockFormat.formatName),
            "version": .number(Double(BlockFormat.version)),
            "tensors": JSONCoding.encode(described),
            "frame_headers_crc32": .number(Double(frameHeadersCRC.value)),
            "result": result,
        ]
        var json = header.serialized()
        let needed = BlockFormat.headerPrefixSize + json.count
        if needed <= reservedHeaderBytes {
            // Trailing whitespace is valid JSON: pad so the data frames need not move.
            json.append(contentsOf: repeatElement(UInt8(ascii: " "), count: reservedHeaderBytes - needed))
        } else {
            try shiftData(by: needed - reservedHeaderBytes)
        }
        var headerFrame: [UInt8] = []
        headerFrame.reserveCapacity(BlockFormat.headerPrefixSize + json.count)
        headerFrame.appendLE32(BlockFormat.headerFrameMagic)
        headerFrame.appendLE32(UInt32(8 + json.count))
        headerFrame.append(contentsOf: BlockFormat.headerPayloadMagic)
        headerFrame.appendLE32(CRC32.checksum(json))
        headerFrame.append(contentsOf: json)
        try headerFrame.withBytes { bytes throws(BlockError) in try writeAll(bytes, at: 0) }

        var table: [UInt8] = []
        let count = entries.count + 1
        table.appendLE32(BlockFormat.seekTableFrameMagic)
        table.appendLE32(UInt32(count * BlockFormat.seekTableEntrySize + BlockFormat.seekTableFooterSize))
        // Entry 0 is the header frame itself, so offsets are sums of sizes from byte 0.
        table.appendLE32(UInt32(headerFrame.count))
        table.appendLE32(0)
        table.appendLE32(0)
        for entry in entries {
            table.appendLE32(UInt32(entry.compressed))
            table.appendLE32(UInt32(entry.decompressed))
            table.appendLE32(entry.checksum)
        }
        table.appendLE32(UInt32(count))
        table.append(BlockFormat.checksumFlag)
        table.appendLE32(BlockFormat.seekableFooterMagic)
        try table.withBytes { bytes throws(BlockError) in try writeAll(bytes, at: position) }
        position += table.count
        if extendedAhead, ftruncate(fd.rawValue, off_t(position)) != 0 {
            throw BlockError("cutting the block to \(position) bytes: \(Errno(rawValue: errno))")
        }
        return position
    }

    /// Moves the data frames `delta` bytes further, last chunk first, when the header outgrew
    /// its reservation.
    private func shiftData(by delta: Int) throws(BlockError) {
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        var end = position
        while end > reservedHeaderBytes {
            let start = max(reservedHeaderBytes, end - chunk)
            let length = end - start
            try buffer.withMutableBytes { raw throws(BlockError) in
                let slice = UnsafeMutableRawBufferPointer(rebasing: raw[0..<length])
                do {
                    let n = try fd.read(fromAbsoluteOffset: Int64(start), into: slice, retryOnInterrupt: true)
                    guard n == length else { throw BlockError("short read while moving block data") }
                } catch let error as BlockError {
                    throw error
                } catch {
                    throw BlockError("reading back block data: \(error)")
                }
                try writeAll(UnsafeRawBufferPointer(slice), at: start + delta)
            }
            end = start
        }
        position += delta
    }

    private func writeAll(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(BlockError) {
        do {
            _ = try fd.writeAll(toAbsoluteOffset: Int64(offset), bytes)
        } catch let errno as Errno {
            throw BlockError("writing the block: \(errno) (errno \(errno.rawValue))")
        } catch {
            throw BlockError("writing the block: \(error)")
        }
    }

    private func check(_ code: Int, _ what: String) throws(BlockError) {
        if ZSTD_isError(code) != 0 {
            throw BlockError("zstd: \(what): \(String(cString: ZSTD_getErrorName(code)))")
        }
    }
}
