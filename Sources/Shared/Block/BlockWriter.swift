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
    /// A block slab the block may fill up to `limit` bytes; past that it moves, once, to the
    /// fresh file `overflow` makes (a client's slab is bounded, a clip's size is an estimate).
    public struct Slab {
        public var fd: FileDescriptor
        public var limit: Int
        public var overflow: () throws(BlockError) -> FileDescriptor

        public init(fd: FileDescriptor, limit: Int, overflow: @escaping () throws(BlockError) -> FileDescriptor) {
            self.fd = fd
            self.limit = limit
            self.overflow = overflow
        }
    }

    private var fd: FileDescriptor
    /// Set while the block is written into a slab.
    private var slab: Slab?
    /// The size `expectedDataBytes` predicts, for extending a fresh file ahead.
    private let expectedSize: Int?
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

    /// Writes the block into `fd`, a fresh file.
    ///
    /// - Parameters:
    ///   - reservedHeaderBytes: space kept free for the header frame; `estimatedHeaderBytes`
    ///     gives a good value. A larger header still works, at the cost of moving the data once.
    ///   - expectedDataBytes: the frames' uncompressed bytes, when known. The file is then
    ///     extended to about the block's size before the first frame (sparse: nothing is
    ///     allocated), so that where the host lets shared memory use transparent huge pages
    ///     (`shmem_enabled = within_size`, docs/operations.md) the frames land in 2 MiB pages:
    ///     a 4 KiB page is counted, mapped and freed separately by the worker's writes, the
    ///     client's mapping and the last close, which on a VM costs more than the copy.
    public convenience init(
        fd: FileDescriptor, level: Int, reservedHeaderBytes: Int, expectedDataBytes: Int? = nil
    ) throws(BlockError) {
        try self.init(fd: fd, level: level, reservedHeaderBytes: reservedHeaderBytes, expectedDataBytes: expectedDataBytes, slab: nil)
    }

    /// Writes the block into a block slab from byte 0 while it fits the slab's limit (the
    /// parameters as above). A slab is never cut: its pages are what makes it worth reusing.
    /// `expectedDataBytes` over the limit sends the block to the slab's overflow file at once.
    public convenience init(slab: Slab, level: Int, reservedHeaderBytes: Int, expectedDataBytes: Int? = nil) throws(BlockError) {
        try self.init(fd: slab.fd, level: level, reservedHeaderBytes: reservedHeaderBytes, expectedDataBytes: expectedDataBytes, slab: slab)
    }

    private init(
        fd: FileDescriptor, level: Int, reservedHeaderBytes: Int, expectedDataBytes: Int?, slab: Slab?
    ) throws(BlockError) {
        self.fd = fd
        self.slab = slab
        self.reservedHeaderBytes = max(reservedHeaderBytes, BlockFormat.headerPrefixSize + 64)
        self.position = self.reservedHeaderBytes
        // Frame headers, raw-block headers and checksums, the seek table: well under 1 %.
        let reserved = self.reservedHeaderBytes
        expectedSize = expectedDataBytes.flatMap { $0 > 0 ? reserved + $0 + $0 / 64 + 65_536 : nil }
        if BlockFormat.storesFrames(level: level) {
            context = nil
        } else {
            guard let context = ZSTD_createCCtx() else { throw BlockError("out of memory creating a zstd context") }
            self.context = context
            try check(ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, Int32(level)), "level \(level)")
            try check(ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 1), "checksum flag")
            try check(ZSTD_CCtx_setParameter(context, ZSTD_c_contentSizeFlag, 1), "content size flag")
        }
        if let slab, let expectedSize, expectedSize > slab.limit {
            try moveOutOfSlab()  // it will not fit: straight to a fresh file, before any byte
        } else if slab == nil {
            try extendAhead()
        }
    }

    deinit { if let context { ZSTD_freeCCtx(context) } }

    /// Whether the block is (still) in the slab it was given; false once it moved to the file
    /// the slab's `overflow` made, or when it had no slab.
    public var isInSlab: Bool { slab != nil }

    /// The file the block is in now: the slab's, or the fresh one.
    public var currentFD: FileDescriptor { fd }

    /// Extends a fresh file to the expected size (sparse: nothing is allocated), so that where
    /// the host lets shared memory use huge pages the frames land in them; `finish` cuts it.
    private func extendAhead() throws(BlockError) {
        guard let expectedSize else { return }
        guard ftruncate(fd.rawValue, off_t(expectedSize)) == 0 else {
            throw BlockError("extending the block to \(expectedSize) bytes: \(Errno(rawValue: errno))")
        }
        extendedAhead = true
    }

    /// Makes room for a write that ends at byte `end`: a block about to outgrow its slab moves
    /// to a fresh file first, with what it holds so far.
    private func ensureRoom(upTo end: Int) throws(BlockError) {
        if let slab, end > slab.limit { try moveOutOfSlab() }
    }

    private func moveOutOfSlab() throws(BlockError) {
        guard let slab else { return }
        let target = try slab.overflow()
        self.slab = nil
        let source = fd
        fd = target
        try extendAhead()
        // The frames written so far; the header space is written only by `finish`.
        try copy(from: source, range: reservedHeaderBytes..<position)
    }

    /// Copies `range` of `source` to the same offsets of the current file.
    private func copy(from source: FileDescriptor, range: Range<Int>) throws(BlockError) {
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: min(chunk, range.count))
        var offset = range.lowerBound
        while offset < range.upperBound {
            let length = min(chunk, range.upperBound - offset)
            try buffer.withMutableBytes { raw throws(BlockError) in
                let slice = UnsafeMutableRawBufferPointer(rebasing: raw[0..<length])
                try readFully(source, into: slice, at: offset)
                try writeAll(UnsafeRawBufferPointer(slice), at: offset)
            }
            offset += length
        }
    }

    private func readFully(_ source: FileDescriptor, into slice: UnsafeMutableRawBufferPointer, at offset: Int) throws(BlockError) {
        do {
            let n = try source.read(fromAbsoluteOffset: Int64(offset), into: slice, retryOnInterrupt: true)
            guard n == slice.count else { throw BlockError("short read while moving block data") }
        } catch let error as BlockError {
            throw error
        } catch {
            throw BlockError("reading back block data: \(error)")
        }
    }

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
        try ensureRoom(upTo: position + cv_stored_zstd_frame_size(bytes.count))
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
        try ensureRoom(upTo: position + delta)
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        var end = position
        while end > reservedHeaderBytes {
            let start = max(reservedHeaderBytes, end - chunk)
            let length = end - start
            try buffer.withMutableBytes { raw throws(BlockError) in
                let slice = UnsafeMutableRawBufferPointer(rebasing: raw[0..<length])
                try readFully(fd, into: slice, at: start)
                try writeAll(UnsafeRawBufferPointer(slice), at: start + delta)
            }
            end = start
        }
        position += delta
    }

    private func writeAll(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(BlockError) {
        try ensureRoom(upTo: offset + bytes.count)
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
