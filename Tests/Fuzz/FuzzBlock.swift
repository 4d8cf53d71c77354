// libFuzzer harness: Sources/Shared/Block/BlockReader.swift, whose contract is that no input makes
// it read out of bounds or trap (docs/block-format.md). Built by bench/fuzz.sh with
// AddressSanitizer, seeded with real blocks from `clipvisor-worker decode --out`.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzBlock(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let raw = UnsafeRawBufferPointer(start: data, count: size)
    guard let layout = try? BlockReader.validate(raw) else { return 0 }
    // What validate accepts, decompress must handle within the block's bounds.
    var total = 0
    for (index, frames) in layout.frames.enumerated() {
        for frame in frames {
            precondition(frame.offset >= 0 && frame.offset + frame.compressedSize <= size, "frame \(index) out of bounds")
        }
        total += layout.header.tensors[index].byteCount ?? 0
    }
    // A header may promise any size; only decompress what a test machine can hold.
    guard total <= 64 << 20 else { return 0 }
    _ = try? BlockReader.read(raw)
    return 0
}
