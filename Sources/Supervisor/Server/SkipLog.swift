import CClipvisorShims
import Logging
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// When a clip is answered from quarantine instead of being decoded again.
struct QuarantinePolicy: Sendable {
    /// Timeouts of the unchanged file before it is quarantined (crashes and OOM: the first).
    var timeoutsToQuarantine = 2
    /// How long an entry lasts, milliseconds (7 days).
    var expiryMs: Int64 = 7 * 86_400_000
}

/// A clip known to fail: answered `quarantined` while its size and mtime are unchanged.
struct QuarantineEntry: Equatable {
    var size: Int64?
    var mtime: Double?
    var reason: SkipReason
    /// When the clip was first seen failing this way.
    var sinceMs: Int64
    var timeouts: Int
    var isQuarantined: Bool
}

/// The skip log: one JSON line per clip-level skip, appended and made durable (fdatasync)
/// before the client is answered; and the quarantine built from it.
///
/// A log that cannot be written (read-only or full disk) is reported loudly — on stderr and in
/// `status` — and never stops decoding.
final class SkipLog {
    let path: String
    let policy: QuarantinePolicy
    let logger: Logger
    private var fd: FileDescriptor?
    /// Why the log is not being written, or nil when it is healthy.
    private(set) var problem: String?
    private var lastProblemLog = Instant(nanoseconds: 0)
    private(set) var entries: [String: QuarantineEntry] = [:]
    /// The newest records, for the `skips` protocol operation (the CLI reads the files).
    private(set) var recent: [SkipRecord] = []
    static let recentLimit = 10_000
    private(set) var recordsWritten = 0

    init(path: String, policy: QuarantinePolicy, logger: Logger) {
        self.path = path
        self.policy = policy
        self.logger = logger
        let now = Timestamp.nowMilliseconds()
        for record in SkipLogFiles.readAll(basePath: path) { apply(record, now: now) }
        recent = Array(recent.suffix(Self.recentLimit))
        open()
    }

    deinit { try? fd?.close() }

    /// The default location: `$STATE_DIRECTORY/skips.jsonl` (systemd), else
    /// `$XDG_STATE_HOME/clipvisor/skips.jsonl`, else `~/.local/state/clipvisor/skips.jsonl`.
    static var defaultPath: String {
        if let state = SocketDiscovery.environment("STATE_DIRECTORY") {
            return "\(state.split(separator: ":").first.map(String.init) ?? state)/skips.jsonl"
        }
        if let xdg = SocketDiscovery.environment("XDG_STATE_HOME") { return "\(xdg)/clipvisor/skips.jsonl" }
        let home = SocketDiscovery.environment("HOME") ?? "/tmp/clipvisor-\(getuid())"
        return "\(home)/.local/state/clipvisor/skips.jsonl"
    }

    /// Reopens the file (after logrotate renamed it on SIGHUP).
    func reopen() {
        try? fd?.close()
        fd = nil
        open()
    }

    private func open() {
        let directory = SkipLogFiles.directory(of: path)
        Filesystem.makeDirectories(directory, mode: 0o750)
        let existed = access(path, F_OK) == 0
        let raw = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640)
        guard raw >= 0 else {
            report("cannot open the skip log \(path): \(Errno(rawValue: errno))")
            return
        }
        fd = FileDescriptor(rawValue: raw)
        if !existed { Filesystem.syncDirectory(directory) }
        problem = nil
    }

    private func report(_ message: String) {
        problem = message
        let now = Instant.now()
        if now.milliseconds(since: lastProblemLog) >= 10_000 || lastProblemLog.nanoseconds == 0 {
            lastProblemLog = now
            logger.critical("\(message); skips are NOT being recorded (decoding continues)")
        }
    }

    /// Appends `record` durably, then updates the quarantine. Returns whether it reached the disk.
    @discardableResult
    func append(_ record: SkipRecord) -> Bool {
        apply(record, now: record.timestampMs)
        if recent.count > Self.recentLimit + 1000 { recent.removeFirst(recent.count - Self.recentLimit) }
        if fd == nil { open() }
        guard let fd else { return false }
        var line = record.json.serialized()
        line.append(UInt8(ascii: "\n"))
        do {
            _ = try fd.writeAll(line)
            guard fdatasync(fd.rawValue) == 0 else { throw Errno(rawValue: errno) }
            recordsWritten += 1
            problem = nil
            return true
        } catch {
            report("cannot write the skip log \(path): \(error)")
            return false
        }
    }

    /// Updates the quarantine and the recent list with one record.
    private func apply(_ record: SkipRecord, now: Int64) {
        switch record.event {
        case .forget:
            if let path = record.path { entries.removeValue(forKey: path) } else { entries.removeAll() }
            return
        case .skip:
            recent.append(record)
        }
        guard let path = record.path, let reason = record.reason else { return }
        guard now - record.timestampMs < policy.expiryMs else { return }
        switch reason {
        case .crashed, .outOfMemory:
            entries[path] = QuarantineEntry(
                size: record.size, mtime: record.mtime, reason: reason, sinceMs: record.timestampMs, timeouts: 0,
                isQuarantined: true)
        case .timeout:
            var entry = entries[path]
            if entry == nil || entry!.size != record.size || entry!.mtime != record.mtime {
                entry = QuarantineEntry(
                    size: record.size, mtime: record.mtime, reason: .timeout, sinceMs: record.timestampMs, timeouts: 0,
                    isQuarantined: false)
            }
            entry!.timeouts += 1
            if entry!.timeouts >= policy.timeoutsToQuarantine { entry!.isQuarantined = true }
            entries[path] = entry
        default:
            break
        }
    }

    /// The live quarantine entry for `path`, if any (expired entries are dropped here).
    func quarantine(for path: String) -> QuarantineEntry? {
        guard let entry = entries[path], entry.isQuarantined else { return nil }
        if Timestamp.nowMilliseconds() - entry.sinceMs >= policy.expiryMs {
            entries.removeValue(forKey: path)
            return nil
        }
        return entry
    }

    /// The file changed or decoded fine: whatever was known against it no longer holds.
    func clear(path: String) {
        entries.removeValue(forKey: path)
    }

    /// Lifts quarantine for one path (or all, with nil) and records that in the log.
    @discardableResult
    func forget(path: String?) -> Int {
        let count = path == nil ? entries.count : (entries[path!] == nil ? 0 : 1)
        append(SkipRecord(event: .forget, path: path))
        return count
    }

    var quarantinedCount: Int { entries.values.filter(\.isQuarantined).count }

    var statusJSON: JSONValue {
        [
            "path": .string(path), "healthy": .bool(problem == nil), "problem": problem.map { .string($0) } ?? .null,
            "records_written": .number(Double(recordsWritten)), "quarantined": .number(Double(quarantinedCount)),
        ]
    }
}

/// Small file-system helpers that do not need Foundation.
enum Filesystem {
    /// `mkdir -p`.
    static func makeDirectories(_ path: String, mode: mode_t) {
        guard !path.isEmpty, access(path, F_OK) != 0 else { return }
        let parent = SkipLogFiles.directory(of: path)
        if parent != path { makeDirectories(parent, mode: mode) }
        mkdir(path, mode)
    }

    /// fsync of a directory, so a newly created file's name survives a crash.
    static func syncDirectory(_ path: String) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }

    /// The whole content of a small file, or nil; `chunk` is the read size (small for /proc).
    static func read(_ path: String, chunk: Int = 1 << 16) -> [UInt8]? {
        try? contents(of: path, chunk: chunk)
    }

    /// The whole content of a file, read until EOF (a /proc file's size reads as 0), with
    /// swift-system's EINTR retries; the error names what failed (EISDIR for a directory).
    static func contents(of path: String, chunk: Int = 1 << 16) throws -> [UInt8] {
        let fd = try FileDescriptor.open(path, .readOnly, options: .closeOnExec)
        defer { try? fd.close() }
        var info = stat()
        if fstat(fd.rawValue, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR { throw Errno.isDirectory }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: chunk)
        while true {
            let n = try buffer.withUnsafeMutableBytes { try fd.read(into: $0) }
            if n == 0 { return out }
            out.append(contentsOf: buffer[0..<n])
        }
    }
}

/// The skip log and its rotated siblings (`skips.jsonl.1`, `skips.jsonl-20261126`,
/// `skips.jsonl.2.gz`...), read oldest to newest.
enum SkipLogFiles {
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// Every file of the log, rotated ones first (by modification time), the live file last.
    static func files(basePath: String) -> [String] {
        let directory = directory(of: basePath)
        let base = String(basePath.split(separator: "/").last ?? "")
        var rotated: [(String, Int)] = []
        if let dir = opendir(directory) {
            defer { closedir(dir) }
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                    String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
                }
                guard name != base, name.hasPrefix(base + ".") || name.hasPrefix(base + "-") else { continue }
                var info = stat()
                let full = "\(directory)/\(name)"
                guard stat(full, &info) == 0 else { continue }
                rotated.append((full, Int(info.st_mtim.tv_sec)))
            }
        }
        return rotated.sorted { $0.1 < $1.1 }.map(\.0) + [basePath]
    }

    /// All records of all files, in timestamp order. Torn or foreign lines are skipped.
    static func readAll(basePath: String) -> [SkipRecord] {
        var records: [SkipRecord] = []
        for file in files(basePath: basePath) {
            guard let bytes = file.hasSuffix(".gz") ? Decompressor.gunzip(file) : Filesystem.read(file) else { continue }
            for line in bytes.split(separator: UInt8(ascii: "\n")) where !line.isEmpty {
                if let value = try? JSONValue.parse(line), let record = SkipRecord(json: value) { records.append(record) }
            }
        }
        return records.enumerated().sorted {
            ($0.element.timestampMs, $0.offset) < ($1.element.timestampMs, $1.offset)
        }.map(\.element)
    }
}

/// Reads gzip-compressed rotated logs through `gzip -dc` (logrotate's default compression),
/// so the supervisor does not link zlib for a start-up-only need.
enum Decompressor {
    static func gunzip(_ path: String) -> [UInt8]? {
        var pipeFDs: [Int32] = [-1, -1]
        guard cv_pipe_cloexec(&pipeFDs) == 0 else { return nil }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 1)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        let argv = ["gzip", "-dc", path]
        var cArguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for pointer in cArguments { free(pointer) } }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, "gzip", &actions, nil, &cArguments, cv_environ())
        close(pipeFDs[1])
        guard rc == 0 else {
            close(pipeFDs[0])
            return nil
        }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = read(pipeFDs[0], &buffer, buffer.count)
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { break }
            out.append(contentsOf: buffer[0..<n])
        }
        close(pipeFDs[0])
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        return status == 0 ? out : nil
    }
}
