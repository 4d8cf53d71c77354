import ArgumentParser
import Logging
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

struct SkipsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "skips",
        abstract: "Show skipped clips from the skip log (rotated files included), or lift quarantine.",
        discussion: """
            Which log: --skip-log when given; else the log of the supervisor that answers on the socket \
            (the path it reports in `status`, whatever --skip-log it was started with); else, when none \
            answers, the default location. The file read, and why, is always printed (on stderr). The \
            files are read directly (rotated ones included); when the supervisor's log is not readable \
            by you, its recent records are asked for through the socket instead. Counts by reason come \
            first, then the records, newest first. --forget lifts quarantine through the running \
            supervisor (or in the log file when none runs) and records that in the log.
            """)

    @Option(help: "Only this reason (timeout, crashed, out_of_memory, decode_error, unsupported, too_large, not_found, permission).")
    var reason: String?

    @Option(help: ArgumentHelp("Only skips newer than this, e.g. 90m, 6h, 7d.", valueName: "duration"))
    var since: String?

    @Option(help: ArgumentHelp("Only clips whose path matches this shell pattern.", valueName: "glob"))
    var path: String?

    @Option(help: "Only skips with this tag.")
    var tag: String?

    @Option(help: "Show at most this many records.")
    var limit: Int = 50

    @Flag(help: "Print one JSON record per line instead of a table.")
    var json = false

    @Option(help: ArgumentHelp("Lift quarantine for this clip.", valueName: "path"))
    var forget: String?

    @Flag(help: "With --forget-all semantics: lift quarantine for every clip.")
    var all = false

    @Option(help: ArgumentHelp(
        "The skip log (default: the running supervisor's, else $STATE_DIRECTORY/skips.jsonl, $XDG_STATE_HOME/clipvisor/skips.jsonl or ~/.local/state/clipvisor/skips.jsonl).",
        valueName: "path"))
    var skipLog: String?

    @Option(parsing: .upToNextOption, help: ArgumentHelp(
        "Merge several nodes' skip logs (files, directories of NODE.jsonl or NODE/skips.jsonl, or patterns) into one view: the same file skipped on several nodes is one entry with its nodes and counts (see docs/skip-log.md).",
        valueName: "dir-or-glob"))
    var merge: [String] = []

    @OptionGroup var connection: ConnectionOptions

    func validate() throws {
        if let reason, SkipReason(rawValue: reason) == nil { throw ValidationError("unknown reason \(reason)") }
        if let since, Timestamp.parseDuration(since) == nil { throw ValidationError("--since: \(since) is not a duration like 6h") }
        if forget != nil && all { throw ValidationError("give --forget PATH or --all, not both") }
        if !merge.isEmpty && (forget != nil || all) { throw ValidationError("--merge shows gathered logs; --forget acts on this node") }
    }

    func run() throws {
        if !merge.isEmpty { return try showMerged() }  // SkipLedger.swift
        let source = try SkipLogSource.locate(explicit: skipLog, connection: connection)
        FileOutput.standardError("clipvisor: skip log \(source.path) (\(source.origin))\n")
        if forget != nil || all {
            try lift(logPath: source.path)
            return
        }
        var filter = SkipFilter()
        filter.reason = reason.flatMap(SkipReason.init(rawValue:))
        filter.sinceMs = since.flatMap(Timestamp.parseDuration).map { Timestamp.nowMilliseconds() - $0 }
        filter.pathGlob = path.map(absolutePattern)
        filter.tag = tag
        let records: [SkipRecord]
        if let client = source.unreadableVia {
            FileOutput.standardError(
                "clipvisor: cannot read \(source.path) (\(Errno(rawValue: EACCES))); showing the supervisor's most recent records through its socket\n")
            records = try recentRecords(from: client, filter: filter)
        } else {
            records = SkipLogFiles.readAll(basePath: source.path).filter(filter.matches).reversed()
        }
        if json {
            for record in records.prefix(limit) { print(record.json.jsonString) }
            return
        }
        print(SkipTable.render(records, limit: limit, logPath: source.path))
    }

    /// The `skips` operation, newest first, for a log this user may not read.
    private func recentRecords(from client: SupervisorClient, filter: SkipFilter) throws -> [SkipRecord] {
        var request: [String: JSONValue] = ["op": "skips", "limit": .number(Double(min(SkipLog.recentLimit, max(limit, 1))))]
        if let reason { request["reason"] = .string(reason) }
        if let sinceMs = filter.sinceMs { request["since_s"] = .number(Double(Timestamp.nowMilliseconds() - sinceMs) / 1000) }
        if let glob = filter.pathGlob { request["path_glob"] = .string(glob) }
        if let tag { request["tag"] = .string(tag) }
        let (answer, _) = try client.call(request, timeoutMs: 10_000)
        guard answer["ok"]?.boolValue == true else {
            throw CleanExit.message("clipvisor: \(answer["error"]?["message"]?.stringValue ?? "skips failed")")
        }
        return (answer["skips"]?.arrayValue ?? []).compactMap(SkipRecord.init(json:))
    }

    private func absolutePattern(_ pattern: String) -> String {
        pattern.hasPrefix("/") || pattern.hasPrefix("*") ? pattern : absolutePath(pattern)
    }

    private func lift(logPath: String) throws {
        let target = forget.map(absolutePath)
        if let client = try? SupervisorClient.connect(candidates: connection.candidates, timeoutMs: 2000) {
            var request: [String: JSONValue] = ["op": "forget"]
            if let target { request["path"] = .string(target) } else { request["all"] = true }
            let (answer, _) = try client.call(request, timeoutMs: 5000)
            guard answer["ok"]?.boolValue == true else {
                throw CleanExit.message("clipvisor: \(answer["error"]?["message"]?.stringValue ?? "forget failed")")
            }
            print("lifted quarantine for \(target ?? "all clips") (\(StatusReport.number(answer["forgotten"])) entries) in the running supervisor")
            return
        }
        var logger = Logger(label: "clipvisor")
        logger.logLevel = .error
        let log = SkipLog(path: logPath, policy: QuarantinePolicy(), logger: logger)
        let count = log.forget(path: target)
        guard log.problem == nil else { throw CleanExit.message("clipvisor: \(log.problem!)") }
        print("lifted quarantine for \(target ?? "all clips") (\(count) entries) in \(logPath); no supervisor is running")
    }
}

/// Which skip log `clipvisor skips` reads, and why; a supervisor started with its own
/// `--skip-log` must be read there, not at the default location.
struct SkipLogSource {
    var path: String
    /// Why this file: said to the user with every listing.
    var origin: String
    /// The running supervisor, when its log exists but this user may not read it.
    var unreadableVia: SupervisorClient?

    static func locate(explicit: String?, connection: ConnectionOptions) throws -> SkipLogSource {
        if let explicit { return SkipLogSource(path: absolutePath(explicit), origin: "given with --skip-log") }
        guard let client = try? SupervisorClient.connect(candidates: connection.candidates, timeoutMs: 2000) else {
            return SkipLogSource(
                path: SkipLog.defaultPath,
                origin: "the default location: no supervisor answered on \(connection.candidates.joined(separator: ", "))")
        }
        let (answer, _) = try client.call(["op": "status"], timeoutMs: 5000)
        let status = answer["status"]
        guard let path = status?["skip_log"]?["path"]?.stringValue else {
            throw CleanExit.message(
                "clipvisor: the supervisor on \(client.socketPath) (pid \(StatusReport.number(status?["pid"]))) reports no skip log; pass --skip-log PATH")
        }
        var source = SkipLogSource(
            path: path, origin: "the log of the supervisor on \(client.socketPath), pid \(StatusReport.number(status?["pid"]))")
        if access(path, F_OK) == 0, access(path, R_OK) != 0 { source.unreadableVia = client }
        return source
    }
}

/// `clipvisor skips` as a table: counts by reason, then newest first.
enum SkipTable {
    static func render(_ records: [SkipRecord], limit: Int, logPath: String) -> String {
        guard !records.isEmpty else { return "no skips in \(logPath)" }
        var counts: [String: Int] = [:]
        for record in records { counts[record.reason?.rawValue ?? "?", default: 0] += 1 }
        var lines = ["\(records.count) skips in \(logPath): " + counts.sorted { $0.value > $1.value }.map { "\($0.key) \($0.value)" }.joined(separator: ", "), ""]
        lines.append(pad("time (UTC)", 24) + pad("reason", 15) + pad("elapsed", 9) + pad("tag", 12) + "path / detail")
        for record in records.prefix(limit) {
            let elapsed = record.elapsedMs.map { "\($0) ms" } ?? "-"
            lines.append(
                pad(Timestamp.rfc3339(milliseconds: record.timestampMs), 24) + pad(record.reason?.rawValue ?? "?", 15)
                    + pad(elapsed, 9) + pad(record.tag ?? "-", 12) + (record.path ?? "?"))
            lines.append(String(repeating: " ", count: 24) + "  " + record.detail)
        }
        if records.count > limit { lines.append("… \(records.count - limit) older records (use --limit)") }
        return lines.joined(separator: "\n")
    }

    private static func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count)
    }
}
