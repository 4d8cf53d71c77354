import Shared

/// Whether blocks can live in 2 MiB pages: the host's transparent-huge-page setting for shared
/// memory (`shmem_enabled`, which governs memfds). A block is a memfd that the worker fills, the
/// client maps and the last close frees; with 4 KiB pages each of those steps touches one page
/// structure and one page-table entry per 4 KiB, which on a VM costs more than copying the bytes
/// (docs/operations.md, "Huge pages for blocks"). The worker extends each block's file to its
/// expected size before writing (`BlockWriter`), so `within_size` covers it. Only the host can
/// change the setting; the supervisor reports it in `status` and says it once at start.
enum BlockPages {
    static let settingPath = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"

    /// The setting in force (the bracketed word, e.g. "never"), nil when the file is absent
    /// (no THP in this kernel) or unreadable.
    static func setting(path: String = settingPath) -> String? {
        guard let bytes = Filesystem.read(path, chunk: 256) else { return nil }
        return parse(String(decoding: bytes, as: UTF8.self))
    }

    /// The word in brackets of "always within_size advise [never] deny force".
    static func parse(_ text: String) -> String? {
        guard let open = text.firstIndex(of: "["), let close = text[open...].firstIndex(of: "]") else { return nil }
        let word = text[text.index(after: open)..<close]
        return word.isEmpty ? nil : String(word)
    }

    /// Whether blocks written by a worker get huge pages under `setting`. "advise" does not:
    /// it needs `madvise` on a mapping, and workers write with `pwrite`.
    static func hugePages(under setting: String) -> Bool {
        ["always", "within_size", "force"].contains(setting)
    }

    static func statusJSON(path: String = settingPath) -> JSONValue {
        guard let setting = setting(path: path) else { return ["shmem_enabled": .null, "huge": false] }
        return ["shmem_enabled": .string(setting), "huge": .bool(hugePages(under: setting))]
    }

    /// What `clipvisor status` says about it, from the status JSON.
    static func line(_ pages: JSONValue) -> String? {
        guard let setting = pages["shmem_enabled"]?.stringValue else { return nil }
        if pages["huge"]?.boolValue == true { return "blocks: 2 MiB pages (shmem_enabled = \(setting))" }
        return "blocks: 4 KiB pages (shmem_enabled = \(setting)); within_size makes the hop of blocks outside block slabs ~2x cheaper: docs/operations.md, \"Huge pages for blocks\""
    }
}
