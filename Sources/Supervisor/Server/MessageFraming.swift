import Shared

/// The client protocol's framing: a 4-byte little-endian length, then that many bytes of JSON.
enum MessageFraming {
    /// Largest message either side accepts (docs/protocol.md).
    static let maxMessageBytes = 1 << 20

    static func frame(_ message: JSONValue) -> [UInt8] {
        let body = message.serialized()
        var out: [UInt8] = []
        out.reserveCapacity(4 + body.count)
        for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: body.count >> (8 * i))) }
        out.append(contentsOf: body)
        return out
    }
}

/// A length prefix outside `1...maxMessageBytes`: the stream cannot be resynchronised.
struct FramingError: Error, CustomStringConvertible {
    var length: Int
    var description: String {
        "message length \(length) is outside 1...\(MessageFraming.maxMessageBytes) bytes"
    }
}

/// Reassembles framed messages from a byte stream read in arbitrary pieces.
struct MessageBuffer {
    private var storage: [UInt8] = []
    private var start = 0

    var isEmpty: Bool { start == storage.count }
    var bufferedBytes: Int { storage.count - start }

    mutating func append(_ bytes: UnsafeRawBufferPointer) {
        if start > 0, start == storage.count {
            storage.removeAll(keepingCapacity: true)
            start = 0
        }
        storage.append(contentsOf: bytes)
    }

    /// Bytes that complete the frame at the head (its length prefix first). Reading no more
    /// than this keeps each read inside one message, which is what ties a received fd to the
    /// message it came with: the kernel may otherwise join one message's tail and the next
    /// message's start, fd included, in one read.
    var bytesToCompleteFrame: Int {
        let have = storage.count - start
        guard have >= 4 else { return 4 - have }
        var length = 0
        for i in 0..<4 { length |= Int(storage[start + i]) << (8 * i) }
        guard length >= 1, length <= MessageFraming.maxMessageBytes else { return 1 }  // next() reports it
        return 4 + length - have
    }

    /// The next complete message body, or nil when more bytes are needed.
    mutating func next() throws(FramingError) -> [UInt8]? {
        guard storage.count - start >= 4 else { return nil }
        var length = 0
        for i in 0..<4 { length |= Int(storage[start + i]) << (8 * i) }
        guard length >= 1, length <= MessageFraming.maxMessageBytes else { throw FramingError(length: length) }
        guard storage.count - start >= 4 + length else { return nil }
        let body = Array(storage[(start + 4)..<(start + 4 + length)])
        start += 4 + length
        if start > 1 << 16, start * 2 > storage.count {
            storage.removeFirst(start)
            start = 0
        }
        return body
    }
}
