// libFuzzer harness: the client protocol's framing (Sources/Supervisor/Server/MessageFraming.swift),
// checked against a direct reading of the same bytes. Built by bench/fuzz.sh.
//
// The first input byte picks how the stream is cut into reads: arbitrary pieces, or reads capped
// by `bytesToCompleteFrame` as the supervisor does (so a read never crosses a message boundary,
// which is what ties a received fd to its message).

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFraming(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size >= 2 else { return 0 }
    let control = data[0]
    let stream = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    let expected = reference(stream)
    var buffer = MessageBuffer()
    var got: [[UInt8]] = []
    var failed: Int?
    var offset = 0
    var piece = Int(control % 7) + 1
    let capped = control & 0x80 != 0
    outer: while offset < stream.count {
        var n = min(piece, stream.count - offset)
        if capped {
            let want = buffer.bytesToCompleteFrame
            precondition(want >= 1, "bytesToCompleteFrame must ask for at least one byte")
            n = min(n, want)
        }
        stream[offset..<(offset + n)].withUnsafeBytes { buffer.append($0) }
        offset += n
        piece = piece * 3 % 17 + 1
        while true {
            do {
                guard let body = try buffer.next() else { break }
                got.append(body)
            } catch {
                failed = error.length
                break outer
            }
        }
    }
    precondition(got == expected.bodies, "bodies differ from a direct reading of the stream")
    // A bad length prefix is reported as soon as its 4 bytes are in, with the length it holds.
    precondition(failed == expected.badLength,
                 "framing error \(String(describing: failed)) but the stream says \(String(describing: expected.badLength))")
    return 0
}

/// Messages of a complete stream read directly: bodies up to the first bad length prefix.
private func reference(_ s: [UInt8]) -> (bodies: [[UInt8]], badLength: Int?) {
    var bodies: [[UInt8]] = []
    var i = 0
    while s.count - i >= 4 {
        let n = Int(s[i]) | Int(s[i + 1]) << 8 | Int(s[i + 2]) << 16 | Int(s[i + 3]) << 24
        if n < 1 || n > MessageFraming.maxMessageBytes { return (bodies, n) }
        guard s.count - i - 4 >= n else { break }
        bodies.append(Array(s[(i + 4)..<(i + 4 + n)]))
        i += 4 + n
    }
    return (bodies, nil)
}
