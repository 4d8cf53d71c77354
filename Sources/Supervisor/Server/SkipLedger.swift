import ArgumentParser
import Shared

#if canImport(Glibc)
import Glibc
#endif

/// One node's skip log among several gathered on shared storage (`clipvisor skips --merge`).
struct LedgerSource: Equatable {
    /// How the merged view names the node (see `SkipLedger.nodeName(ofLog:)`).
    var node: String
    /// The live log file; its rotated siblings are read with it.
    var basePath: String
}

/// A clip as the cluster knows it: one file (path + size + mtime) and every skip of it on every node.
struct LedgerEntry: Equatable {
    /// Skips of this file on one node.
    struct NodeSkips: Equatable {
        var count = 0
        var reasons: [SkipReason: Int] = [:]
        var firstMs: Int64 = .max
        var lastMs: Int64 = .min
    }

    var path: String
    var size: Int64?
    var mtime: Double?
    var nodes: [String: NodeSkips] = [:]
    var firstMs: Int64 = .max
    var lastMs: Int64 = .min
    /// The newest skip's reason and detail.
    var lastReason: SkipReason = .decodeError
    var lastDetail = ""

    var count: Int { nodes.values.reduce(0) { $0 + $1.count } }

    var reasons: [SkipReason: Int] {
        var out: [SkipReason: Int] = [:]
        for node in nodes.values { for (reason, n) in node.reasons { out[reason, default: 0] += n } }
        return out
    }

    mutating func add(_ record: SkipRecord, node: String) {
        guard let reason = record.reason else { return }
        var skips = nodes[node] ?? NodeSkips()
        skips.count += 1
        skips.reasons[reason, default: 0] += 1
        skips.firstMs = min(skips.firstMs, record.timestampMs)
        skips.lastMs = max(skips.lastMs, record.timestampMs)
        nodes[node] = skips
        firstMs = min(firstMs, record.timestampMs)
        if record.timestampMs >= lastMs {
            lastMs = record.timestampMs
            lastReason = reason
            lastDetail = record.detail
        }
    }

    /// One JSON line of `skips --merge --json`: a superset of a skip-log record (`ts`, `path`,
    /// `size`, `mtime`, `reason`, `detail` of the newest skip), so that tools reading skip logs,
    /// and `serve --quarantine-import`, read it too; plus `count`, `reasons`, `first` and `nodes`.
    var json: JSONValue {
        func reasonsJSON(_ reasons: [SkipReason: Int]) -> JSONValue {
            .object(Dictionary(uniqueKeysWithValues: reasons.map { ($0.key.rawValue, JSONValue.number(Double($0.value))) }))
        }
        var nodeFields: [String: JSONValue] = [:]
        for (name, skips) in nodes {
            nodeFields[name] = [
                "count": .number(Double(skips.count)), "reasons": reasonsJSON(skips.reasons),
                "first": .string(Timestamp.rfc3339(milliseconds: skips.firstMs)),
                "last": .string(Timestamp.rfc3339(milliseconds: skips.lastMs)),
            ]
        }
        return [
            "ts": .string(Timestamp.rfc3339(milliseconds: lastMs)), "first": .string(Timestamp.rfc3339(milliseconds: firstMs)),
            "path": .string(path), "size": size.map { .number(Double($0)) } ?? .null, "mtime": mtime.map { .number($0) } ?? .null,
            "reason": .string(lastReason.rawValue), "detail": .string(lastDetail), "count": .number(Double(count)),
            "reasons": reasonsJSON(reasons), "nodes": .object(nodeFields),
        ]
    }
}

/// The cluster's skip ledger: several nodes' skip logs merged into one deduplicated view.
///
/// Each node's log stays the source of truth; the ledger is computed from copies gathered on
/// shared storage, whenever it is asked for. The same file (path, size and mtime all equal)
/// skipped on several nodes is one entry with per-node counts; a file that changed is a new
/// entry. A `forget` record lifts what its own node knew of a path before it (as it lifts that
/// node's quarantine), not what other nodes saw.
enum SkipLedger {
    struct SourceError: Error, CustomStringConvertible {
        var description: String
    }

    /// The logs named by `arguments`: each a log file, a directory, or a shell pattern of either.
    ///
    /// A directory contributes each `NAME.jsonl` in it and each `NODE/skips.jsonl` one level
    /// down (the layout of `rsync node:/var/lib/clipvisor/ DIR/NODE/`). Rotated siblings
    /// (`skips.jsonl.1`, `.2.gz`...) are read with their log, never as logs of their own.
    static func sources(_ arguments: [String]) throws(SourceError) -> [LedgerSource] {
        var out: [LedgerSource] = []
        for argument in arguments {
            let matches = expand(argument)
            guard !matches.isEmpty else { throw SourceError(description: "\(argument): no such file, directory or match") }
            var found: [String] = []
            for path in matches {
                if isDirectory(path) {
                    for name in listDirectory(path).sorted() {
                        let full = path.hasSuffix("/") ? path + name : "\(path)/\(name)"
                        if name.hasSuffix(".jsonl"), !isDirectory(full) {
                            found.append(full)
                        } else if isDirectory(full), access("\(full)/skips.jsonl", F_OK) == 0 {
                            found.append("\(full)/skips.jsonl")
                        }
                    }
                } else {
                    found.append(path)
                }
            }
            // A pattern like `logs/*` also matches rotated files, which are read with their log.
            let logs = found
            found.removeAll { file in logs.contains { file != $0 && (file.hasPrefix($0 + ".") || file.hasPrefix($0 + "-")) } }
            guard !found.isEmpty else { throw SourceError(description: "\(argument): holds no skip log (*.jsonl or NODE/skips.jsonl)") }
            for file in found where !out.contains(where: { $0.basePath == file }) {
                out.append(LedgerSource(node: nodeName(ofLog: file), basePath: file))
            }
        }
        return out
    }

    /// The node a gathered log belongs to: its file name without `.jsonl` (`node-a.jsonl` →
    /// `node-a`), or, for a file named `skips.jsonl`, the directory holding it
    /// (`logs/node-a/skips.jsonl` → `node-a`). A record's own `host` field, when present, wins.
    static func nodeName(ofLog path: String) -> String {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        guard var name = parts.last else { return path }
        if name.hasSuffix(".jsonl") { name.removeLast(".jsonl".count) }
        if name == "skips", parts.count >= 2 { return parts[parts.count - 2] }
        return name
    }

    /// Reads every source (rotated files too) and merges them. Records that do not pass `filter`
    /// are left out; forget records are applied first.
    static func read(_ sources: [LedgerSource], filter: SkipFilter = SkipFilter()) -> [LedgerEntry] {
        var tagged: [(node: String, record: SkipRecord)] = []
        for source in sources {
            for file in SkipLogFiles.files(basePath: source.basePath) {
                guard let bytes = file.hasSuffix(".gz") ? Decompressor.gunzip(file) : Filesystem.read(file) else { continue }
                for line in bytes.split(separator: UInt8(ascii: "\n")) where !line.isEmpty {
                    guard let value = try? JSONValue.parse(line), let record = SkipRecord(json: value) else { continue }
                    tagged.append((value["host"]?.stringValue ?? source.node, record))
                }
            }
        }
        return merge(tagged, filter: filter)
    }

    /// Merges records tagged with their node into entries, newest first.
    static func merge(_ records: [(node: String, record: SkipRecord)], filter: SkipFilter = SkipFilter()) -> [LedgerEntry] {
        // Per node, in time order: a forget drops that node's earlier records of the path (or all).
        var byNode: [String: [SkipRecord]] = [:]
        let ordered = records.enumerated().sorted {
            ($0.element.record.timestampMs, $0.offset) < ($1.element.record.timestampMs, $1.offset)
        }
        for (_, item) in ordered {
            switch item.record.event {
            case .forget:
                if let path = item.record.path {
                    byNode[item.node]?.removeAll { $0.path == path }
                } else {
                    byNode[item.node] = []
                }
            case .skip:
                byNode[item.node, default: []].append(item.record)
            }
        }
        struct Key: Hashable {
            var path: String
            var size: Int64?
            var mtime: Double?
        }
        var entries: [Key: LedgerEntry] = [:]
        for (node, nodeRecords) in byNode {
            for record in nodeRecords where filter.matches(record) {
                guard let path = record.path else { continue }
                let key = Key(path: path, size: record.size, mtime: record.mtime)
                entries[key, default: LedgerEntry(path: path, size: record.size, mtime: record.mtime)].add(record, node: node)
            }
        }
        return entries.values.sorted { ($0.lastMs, $0.path) > ($1.lastMs, $1.path) }
    }

    // MARK: - Rendering

    /// `clipvisor skips --merge` as a table: totals, then one entry per file, newest first.
    static func render(_ entries: [LedgerEntry], sources: [LedgerSource], limit: Int) -> String {
        let nodeNames = Set(sources.map(\.node)).sorted()
        guard !entries.isEmpty else { return "no skips in \(sources.count) logs (nodes \(nodeNames.joined(separator: ", ")))" }
        var counts: [String: Int] = [:]
        for entry in entries { for (reason, n) in entry.reasons { counts[reason.rawValue, default: 0] += n } }
        let total = entries.reduce(0) { $0 + $1.count }
        let seen = Set(entries.flatMap { $0.nodes.keys }).count
        var lines = [
            "\(entries.count) clips skipped \(total) times on \(seen) of \(nodeNames.count) nodes: "
                + counts.sorted { ($0.value, $1.key) > ($1.value, $0.key) }.map { "\($0.key) \($0.value)" }.joined(separator: ", "),
            "",
        ]
        lines.append(pad("last (UTC)", 24) + pad("reason", 15) + pad("skips", 7) + pad("nodes", 28) + "path / detail")
        for entry in entries.prefix(limit) {
            let nodes = entry.nodes.sorted { $0.key < $1.key }.map { $0.value.count == 1 ? $0.key : "\($0.key)×\($0.value.count)" }
            lines.append(
                pad(Timestamp.rfc3339(milliseconds: entry.lastMs), 24) + pad(entry.lastReason.rawValue, 15) + pad("\(entry.count)", 7)
                    + pad(nodes.joined(separator: ","), 28) + entry.path)
            lines.append(String(repeating: " ", count: 24) + "  " + entry.lastDetail)
        }
        if entries.count > limit { lines.append("… \(entries.count - limit) more clips (use --limit)") }
        return lines.joined(separator: "\n")
    }

    /// Reads, merges and prints (`clipvisor skips --merge`).
    static func show(arguments: [String], filter: SkipFilter, limit: Int, json: Bool) throws(SourceError) {
        let sources = try sources(arguments)
        let entries = read(sources, filter: filter)
        if json {
            for entry in entries.prefix(limit) { print(entry.json.jsonString) }
        } else {
            print(render(entries, sources: sources, limit: limit))
        }
    }

    // MARK: - Files

    private static func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count)
    }

    /// A shell pattern's matches (glob(3)), or the argument itself when it has no pattern characters.
    static func expand(_ argument: String) -> [String] {
        guard argument.contains(where: { "*?[".contains($0) }) else {
            return access(argument, F_OK) == 0 ? [argument] : []
        }
        var result = glob_t()
        defer { globfree(&result) }
        guard glob(argument, 0, nil, &result) == 0 else { return [] }
        return (0..<Int(result.gl_pathc)).compactMap { i in result.gl_pathv[i].map { String(cString: $0) } }
    }

    static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
    }

    private static func listDirectory(_ path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != ".", name != "..", !name.hasPrefix(".") { names.append(name) }
        }
        return names
    }
}

extension SkipsCommand {
    /// `clipvisor skips --merge`: the gathered logs, with this command's filters; an argument that
    /// names no log exits 66 (EX_NOINPUT) with a message naming it.
    func showMerged() throws {
        var filter = SkipFilter()
        filter.reason = reason.flatMap(SkipReason.init(rawValue:))
        filter.sinceMs = since.flatMap(Timestamp.parseDuration).map { Timestamp.nowMilliseconds() - $0 }
        filter.pathGlob = path.map { $0.hasPrefix("/") || $0.hasPrefix("*") ? $0 : absolutePath($0) }
        filter.tag = tag
        do {
            try SkipLedger.show(arguments: merge, filter: filter, limit: limit, json: json)
        } catch {
            ServeCommand.printError("clipvisor: \(error)")
            throw ExitCode(66)
        }
    }
}
