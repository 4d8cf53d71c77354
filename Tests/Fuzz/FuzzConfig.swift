// libFuzzer harness: the TOML config (Sources/Supervisor/Config/ConfigFile.swift, toml++ through
// TOMLKit underneath). Any text must give a ConfigFile or a ConfigError, never a crash. Built by
// bench/fuzz.sh against the objects of the debug build, with toml++ itself recompiled for coverage.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzConfig(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard let text = String(validating: UnsafeBufferPointer(start: data, count: size), as: UTF8.self) else { return 0 }
    _ = try? ConfigFile.parse(text, path: "fuzz.toml")
    return 0
}
