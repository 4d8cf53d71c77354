import Foundation
import Shared
import Testing

@testable import Supervisor

/// The cluster's skip ledger (`clipvisor skips --merge`) and the shared quarantine
/// (`serve --quarantine-import`): merging real log files, and real supervisors acting on them.
@Suite(.serialized, .timeLimit(.minutes(3)))
final class SkipLedgerTests {
    let fixtures = TemporaryDirectory("ledger")

    /// A skip-log line as a supervisor writes it.
    private func line(
        _ ts: String, _ path: String, _ reason: String, size: Int? = 1000, mtime: Double? = 1_700_000_000.25, tag: String? = nil
    ) -> String {
        var fields: [String: JSONValue] = [
            "ts": .string(ts), "path": .string(path), "reason": .string(reason), "detail": .string("\(path): \(reason)"),
            "size": size.map { .number(Double($0)) } ?? .null, "mtime": mtime.map { .number($0) } ?? .null,
            "elapsed_ms": 5, "deadline_ms": 1000, "request_id": 1, "client_pid": 1, "client_uid": 0,
        ]
        if let tag { fields["tag"] = .string(tag) }
        return JSONValue.object(fields).jsonString
    }

    private func write(_ path: String, _ lines: [String]) throws {
        try FileManager.default.createDirectory(
            atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try (lines.joined(separator: "\n") + "\n").write(toFile: path, atomically: true, encoding: .utf8)
    }

    /// Runs the real `clipvisor` with `arguments`; returns (status, stdout, stderr).
    private func cli(_ arguments: [String]) throws -> (Int32, String, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Binaries.supervisor)
        process.arguments = arguments
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: stdout, as: UTF8.self), String(decoding: stderr, as: UTF8.self))
    }

    /// Two nodes' logs in the two layouts `--merge` reads, with a rotated file and a torn line.
    private func gatheredLogs() throws -> String {
        let root = fixtures.file("gathered")
        try write("\(root)/node-a.jsonl.1", [line("2026-12-01T10:00:00.000Z", "/d/x.mp4", "timeout")])
        try write("\(root)/node-a.jsonl", [
            line("2026-12-01T11:00:00.000Z", "/d/x.mp4", "timeout"),
            line("2026-12-01T11:05:00.000Z", "/d/z.mp4", "decode_error"),
            #"{"ts":"2026-12-01T11:06:00.000Z","event":"forget","path":"/d/z.mp4"}"#,
            line("2026-12-01T11:07:00.000Z", "/d/w.mp4", "not_found", size: nil, mtime: nil),
            #"{"ts":"2026-12-01T11:08:00.000Z","path":"/d/torn"#,
        ])
        try write("\(root)/node-b/skips.jsonl", [
            line("2026-12-01T12:00:00.000Z", "/d/x.mp4", "crashed"),
            line("2026-12-01T12:01:00.000Z", "/d/x.mp4", "timeout", size: 2000),  // the file changed: another entry
            line("2026-12-01T12:02:00.000Z", "/d/z.mp4", "decode_error"),
        ])
        return root
    }

    @Test func mergeDeduplicatesTheSameFileAcrossNodes() throws {
        let root = try gatheredLogs()
        let sources = try SkipLedger.sources([root])
        #expect(sources.map(\.node) == ["node-a", "node-b"])
        #expect(sources.map(\.basePath) == ["\(root)/node-a.jsonl", "\(root)/node-b/skips.jsonl"])
        let entries = SkipLedger.read(sources)
        #expect(entries.count == 4, "\(entries.map(\.path))")
        let x = try #require(entries.first { $0.path == "/d/x.mp4" && $0.size == 1000 })
        #expect(x.count == 3)
        #expect(x.nodes["node-a"]?.count == 2 && x.nodes["node-a"]?.reasons == [.timeout: 2], "the rotated file counts too")
        #expect(x.nodes["node-b"]?.reasons == [.crashed: 1])
        #expect(x.reasons == [.timeout: 2, .crashed: 1])
        #expect(x.lastReason == .crashed && x.lastDetail == "/d/x.mp4: crashed")
        #expect(x.firstMs == Timestamp.parseRFC3339("2026-12-01T10:00:00.000Z"))
        let changed = try #require(entries.first { $0.path == "/d/x.mp4" && $0.size == 2000 })
        #expect(changed.count == 1 && changed.nodes.keys.sorted() == ["node-b"])
        // node-a forgot z before node-b saw it: only node-b's skip remains.
        let z = try #require(entries.first { $0.path == "/d/z.mp4" })
        #expect(z.nodes.keys.sorted() == ["node-b"] && z.count == 1)
        #expect(entries.first { $0.path == "/d/w.mp4" }?.size == nil)
        #expect(entries.map(\.lastMs) == entries.map(\.lastMs).sorted(by: >), "newest first")

        // The filters of `skips` apply to the records before they are merged.
        var filter = SkipFilter()
        filter.reason = .timeout
        let timeouts = SkipLedger.read(sources, filter: filter)
        #expect(timeouts.count == 2 && timeouts.allSatisfy { $0.reasons.keys.sorted { $0.rawValue < $1.rawValue } == [.timeout] })

        // A pattern matches rotated files too; they are read with their log, not as nodes.
        let globbed = try SkipLedger.sources(["\(root)/*"])
        #expect(globbed.map(\.node).sorted() == ["node-a", "node-b"], "\(globbed)")
        #expect(SkipLedger.nodeName(ofLog: "/shared/logs/gpu17/skips.jsonl") == "gpu17")
        #expect(SkipLedger.nodeName(ofLog: "/shared/logs/gpu17.jsonl") == "gpu17")
        #expect(throws: SkipLedger.SourceError.self) { try SkipLedger.sources([self.fixtures.file("nothing-*")]) }
    }

    @Test func theMergedJSONIsReadAsSkipRecordsAndAsAQuarantine() throws {
        let entries = SkipLedger.read(try SkipLedger.sources([try gatheredLogs()]))
        let x = try #require(entries.first { $0.path == "/d/x.mp4" && $0.size == 1000 })
        let record = try #require(SkipRecord(json: x.json))
        #expect(record.path == "/d/x.mp4" && record.size == 1000 && record.mtime == 1_700_000_000.25 && record.reason == .crashed)
        #expect(x.json["nodes"]?["node-a"]?["count"]?.intValue == 2)
        #expect(x.json["count"]?.intValue == 3)

        let now = Timestamp.parseRFC3339("2026-12-02T00:00:00.000Z")!
        let ledger = Array(entries.map(\.json.jsonString).joined(separator: "\n").utf8)
        let imported = QuarantineImport.parse(ledger, policy: QuarantinePolicy(), now: now)
        // x crashed on node-b (its newest version timed out once only: not enough by itself);
        // z and w were decode errors and missing files, which are never quarantined.
        #expect(imported.keys.sorted() == ["/d/x.mp4"])
        #expect(imported["/d/x.mp4"]?.size == 1000 && imported["/d/x.mp4"]?.reason == .crashed)

        // Timeouts on different nodes add up to the local threshold.
        let timeouts = [
            line("2026-12-01T10:00:00.000Z", "/d/hang.mp4", "timeout", size: nil, mtime: nil),
            line("2026-12-01T10:30:00.000Z", "/d/hang.mp4", "timeout", size: nil, mtime: nil),
            line("2026-12-01T10:40:00.000Z", "/d/once.mp4", "timeout"),
            line("2026-11-01T10:00:00.000Z", "/d/old.mp4", "crashed"),
        ].joined(separator: "\n")
        let hung = QuarantineImport.parse(Array(timeouts.utf8), policy: QuarantinePolicy(), now: now)
        #expect(hung.keys.sorted() == ["/d/hang.mp4"], "once.mp4 timed out once; old.mp4 expired")
        #expect(hung["/d/hang.mp4"]?.reason == .timeout && hung["/d/hang.mp4"]?.size == nil)
        let forgotten = timeouts + "\n" + #"{"ts":"2026-12-01T11:00:00.000Z","event":"forget","path":"/d/hang.mp4"}"#
        #expect(QuarantineImport.parse(Array(forgotten.utf8), policy: QuarantinePolicy(), now: now).isEmpty)
    }

    @Test func theCLIShowsOneViewAndRefusesWhatItCannotRead() throws {
        let root = try gatheredLogs()
        let (status, table, _) = try cli(["skips", "--merge", "\(root)/node-a.jsonl", "\(root)/node-b", "--limit", "10"])
        #expect(status == 0)
        #expect(table.contains("4 clips skipped 6 times on 2 of 2 nodes"), "\(table)")
        #expect(table.contains("node-a×2,node-b"), "\(table)")
        let (jsonStatus, json, _) = try cli(["skips", "--merge", root, "--json", "--reason", "crashed"])
        #expect(jsonStatus == 0)
        let lines = json.split(separator: "\n").compactMap { try? JSONValue.parse(Array($0.utf8)) }
        #expect(lines.count == 1 && lines.first?["path"]?.stringValue == "/d/x.mp4", "\(json)")
        let (missing, _, stderr) = try cli(["skips", "--merge", fixtures.file("no-such-dir")])
        #expect(missing == 66)
        #expect(stderr.contains("no-such-dir"), "\(stderr)")
    }

    /// Node A crashes on a clip and times out on a FIFO, node B times out on the FIFO too; their
    /// logs merged are node C's quarantine import: C answers `quarantined` at once for both,
    /// although C itself would decode the clip fine and has never seen the FIFO.
    @Test func aSupervisorQuarantinesWhatOtherNodesFoundFailing() throws {
        let shared = TemporaryDirectory("ledger-data")
        let good = shared.file("good.mp4")
        try Fixtures.clip(at: good, seconds: 1)
        let crasher = shared.file("CRASHME.mp4")
        try FileManager.default.copyItem(atPath: good, toPath: crasher)
        let fifo = shared.file("hang.mp4")
        Fixtures.fifo(at: fifo)

        let nodeA = try SupervisorProcess(
            arguments: ["--workers", "1"], environment: [WorkerMessage.faultEnvironmentKey: "crash-on=CRASHME"], label: "node-a")
        let nodeB = try SupervisorProcess(arguments: ["--workers", "1"], label: "node-b")
        #expect(try nodeA.client().decode(crasher).0.errorReason == "crashed")
        #expect(try nodeA.client().decode(fifo, ["deadline_ms": 300]).0.errorReason == "timeout")
        #expect(try nodeB.client().decode(fifo, ["deadline_ms": 300]).0.errorReason == "timeout")
        let gathered = fixtures.file("cluster")
        try FileManager.default.createDirectory(atPath: "\(gathered)/node-b", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: nodeA.skipLogPath, toPath: "\(gathered)/node-a.jsonl")
        try FileManager.default.copyItem(atPath: nodeB.skipLogPath, toPath: "\(gathered)/node-b/skips.jsonl")
        let (status, json, stderr) = try cli(["skips", "--merge", gathered, "--json"])
        #expect(status == 0, "\(stderr)")
        let ledger = fixtures.file("ledger.jsonl")
        try json.write(toFile: ledger, atomically: true, encoding: .utf8)
        let hang = try #require(json.split(separator: "\n").compactMap { try? JSONValue.parse(Array($0.utf8)) }
            .first { $0["path"]?.stringValue == fifo })
        #expect(hang["count"]?.intValue == 2 && hang["nodes"]?["node-a"] != nil && hang["nodes"]?["node-b"] != nil)

        let nodeC = try SupervisorProcess(arguments: ["--workers", "1", "--quarantine-import", ledger], label: "node-c")
        #expect(nodeC.waitForStatus { $0["quarantine_import"]?["entries"]?.intValue == 2 }, "\((try? nodeC.status())?.jsonString ?? "no status")")
        let client = try nodeC.client()
        let start = Date()
        let (crashAnswer, _) = try client.decode(crasher)
        let (hangAnswer, _) = try client.decode(fifo, ["deadline_ms": 5000])
        #expect(crashAnswer.errorReason == "quarantined", "\(crashAnswer.jsonString)")
        #expect(hangAnswer.errorReason == "quarantined", "\(hangAnswer.jsonString)")
        #expect(Date().timeIntervalSince(start) < 3, "answered at once, not after the 5 s deadline")
        #expect(try client.decode(good, ["frames": 2]).0["ok"]?.boolValue == true)
        #expect(nodeC.skipRecords().isEmpty, "answers from quarantine are not logged again")

        // The ledger is re-read when it changes: a newly gathered crash of good.mp4 applies.
        var info = stat()
        stat(good, &info)
        let mtime = Double(info.st_mtim.tv_sec) + Double(info.st_mtim.tv_nsec) / 1e9
        let added = json + line(Timestamp.rfc3339(milliseconds: Timestamp.nowMilliseconds()), good, "crashed",
                                size: Int(info.st_size), mtime: mtime) + "\n"
        try added.write(toFile: ledger, atomically: true, encoding: .utf8)
        #expect(nodeC.waitForStatus { $0["quarantine_import"]?["entries"]?.intValue == 3 }, "\((try? nodeC.status())?.jsonString ?? "no status")")
        #expect(try client.decode(good, ["frames": 2]).0.errorReason == "quarantined")

        // SIGHUP re-reads it even unchanged; a vanished ledger keeps what was read and says why.
        let loads = try nodeC.status()["quarantine_import"]?["loads"]?.intValue ?? 0
        kill(nodeC.pid, SIGHUP)
        #expect(nodeC.waitForStatus { ($0["quarantine_import"]?["loads"]?.intValue ?? 0) > loads })
        try FileManager.default.removeItem(atPath: ledger)
        #expect(nodeC.waitForStatus { $0["quarantine_import"]?["problem"]?.stringValue?.contains(ledger) == true })
        #expect(try client.decode(good, ["frames": 2]).0.errorReason == "quarantined")
        for node in [nodeA, nodeB, nodeC] { #expect(node.stop() == 0) }
    }
}
