import CZstd

/// Constants of the block format (docs/block-format.md): a skippable header frame, one zstd
/// frame per video frame or audio chunk, and a zstd-seekable seek table at the end.
public enum BlockFormat {
    /// Skippable-frame magic of the header frame (first of the 16 skippable magics).
    public static let headerFrameMagic: UInt32 = 0x184D_2A50
    /// Skippable-frame magic of the seek table, fixed by the zstd seekable format.
    public static let seekTableFrameMagic: UInt32 = 0x184D_2A5E
    /// Last four bytes of a seekable file, fixed by the zstd seekable format.
    public static let seekableFooterMagic: UInt32 = 0x8F92_EAB1
    /// "CVB1": the first bytes of the header frame's payload.
    public static let headerPayloadMagic: [UInt8] = Array("CVB1".utf8)
    public static let formatName = "clipvisor-block"
    public static let version = 1
    /// Bytes before the header JSON: skippable magic, frame size, payload magic, CRC32.
    public static let headerPrefixSize = 16
    /// Size of the seek table footer: frame count, descriptor, seekable magic.
    public static let seekTableFooterSize = 9
    /// Seek table entry with checksum: compressed size, decompressed size, checksum.
    public static let seekTableEntrySize = 12
    /// Descriptor bit saying every entry carries a checksum.
    public static let checksumFlag: UInt8 = 0x80
    /// Upper bound on the header JSON, so a reader never allocates for a lying length field.
    public static let maxHeaderBytes = 64 << 20
    /// Largest decompressed frame the reader accepts (a 16K RGB frame is 805 MB).
    public static let maxFrameBytes = 1 << 31

    /// The default level for the shared-memory hop. Decoded natural video barely compresses
    /// (ratio ~1.06 at −5), and decompressing real zstd blocks in Python runs at 0.8 GB/s while
    /// stored raw blocks copy at ~5 GB/s, so the hop stores; bench/zstd_levels.py measures it.
    public static let defaultLevel = -1000
    public static let minLevel = Int(ZSTD_minCLevel())
    public static let maxLevel = Int(ZSTD_maxCLevel())
    /// At or below this level frames are *stored*: raw zstd blocks, no compression. Natural video
    /// frames barely compress at these levels anyway (ratio 1.00-1.04, docs/benchmark-method.md,
    /// the zstd level tables), and skipping the compressor saves a pass and a copy per frame.
    public static let storedLevelBound = -1000

    public static func storesFrames(level: Int) -> Bool { level <= storedLevelBound }

    /// Bytes of a zstd frame's header (magic, descriptor, window, dictionary id, content size),
    /// or nil when `frame` is too short. Those bytes are covered by the block header's
    /// `frame_headers_crc32`, because a zstd decoder ignores some of their bits.
    public static func zstdFrameHeaderSize(_ frame: UnsafeRawBufferPointer) -> Int? {
        guard frame.count >= 5 else { return nil }
        let descriptor = frame[4]
        let singleSegment = descriptor & 0x20 != 0
        let contentSizeBytes = [singleSegment ? 1 : 0, 2, 4, 8][Int(descriptor >> 6)]
        let dictionaryBytes = [0, 1, 2, 4][Int(descriptor & 0x03)]
        let size = 5 + (singleSegment ? 0 : 1) + dictionaryBytes + contentSizeBytes
        return size <= frame.count ? size : nil
    }

    /// Audio chunk length in seconds: one zstd frame per channel per chunk, so a reader can stream.
    public static let audioChunkSeconds = 1
}

/// How one tensor is laid out in a block: its bytes (C order) are the concatenation of the
/// decompressed contents of `frameSizes.count` consecutive data frames.
public struct BlockTensor: Sendable, Equatable, Codable {
    public enum DType: String, Sendable, Codable {
        case uint8, float32
        public var size: Int {
            switch self {
            case .uint8: 1
            case .float32: 4
            }
        }
    }

    /// "video" or "audio".
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    /// "TCHW" or "THWC" for video, "CN" (channels, samples) for planar audio.
    public var layout: String
    /// Decompressed size of each data frame of this tensor, in order.
    public var frameSizes: [Int]

    public init(name: String, dtype: DType, shape: [Int], layout: String, frameSizes: [Int]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.layout = layout
        self.frameSizes = frameSizes
    }

    /// Bytes of the raw tensor; nil when the shape overflows.
    public var byteCount: Int? {
        var total = dtype.size
        for dim in shape {
            guard dim >= 0 else { return nil }
            let (product, overflow) = total.multipliedReportingOverflow(by: dim)
            guard !overflow else { return nil }
            total = product
        }
        return total
    }
}

/// A malformed, tampered or truncated block, or a failure to write one.
public struct BlockError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    /// The block could not be written for want of memory (the clip is then `out_of_memory`).
    public var outOfMemory: Bool
    public init(_ message: String, outOfMemory: Bool = false) {
        self.message = message
        self.outOfMemory = outOfMemory
    }
    public var description: String { "invalid block: \(message)" }
}

/// Little-endian integer access on raw bytes that never reads out of bounds.
extension UnsafeRawBufferPointer {
    func readLE32(at offset: Int) -> UInt32? {
        guard offset >= 0, offset <= count - 4 else { return nil }
        var value: UInt32 = 0
        for i in 0..<4 { value |= UInt32(self[offset + i]) << (8 * UInt32(i)) }
        return value
    }
}

extension Array where Element == UInt8 {
    mutating func appendLE32(_ value: UInt32) {
        for i in 0..<4 { append(UInt8(truncatingIfNeeded: value >> (8 * UInt32(i)))) }
    }
}
