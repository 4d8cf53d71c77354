import Foundation
import Shared
import SystemPackage
import Testing

@testable import Supervisor

/// The skip log and quarantine, against a real supervisor and real workers.
@Suite(.serialized, .timeLimit(.minutes(5)))
final class SkipLogTests {
    let fixtures = TemporaryDirectory("skips")
    var goodClip: String { fixtures.file("good.mp4") }

    init() throws {
        try Fixtures.clip(at: goodClip, seconds: 1)
    }

    private func copy(_ name: String) throws -> String { try fixtures.copy(of: goodClip, as: name) }

    @Test func eachClipLevelSkipWritesExactlyOneRecordWithItsFields() throws {
        // A small address-space limit makes the oom-on fault hit it quickly.
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1", "--worker-memory", "1536"],
            environment: [WorkerMessage.faultEnvironmentKey: "crash-on=CRASHME,oom-on=OOMME"])
        let client = try supervisor.client()
        let fifo = fixtures.file("t.fifo")
        Fixtures.fifo(at: fifo)
        let cases: [(String, String, [String: JSONValue])] = [
            (fixtures.file("nope.mp4"), "not_found", [:]),
            (Corpus.path("mp4parse-rust__chunk_out_of_range.mp4"), "decode_error", [:]),
            (Corpus.path("libwebm__invalid_vp9_bitstream-bug_1416.webm"), "too_large", [:]),
            (fixtures.path, "unsupported", [:]),
            (fifo, "timeout", ["deadline_ms": 300]),
            (try copy("CRASHME.mp4"), "crashed", [:]),
            (try copy("OOMME.mp4"), "out_of_memory", [:]),
        ]
        for (index, (path, reason, extra)) in cases.enumerated() {
            var request = extra
            request["tag"] = .string("job-\(index)")
            let (answer, _) = try client.decode(path, request)
            #expect(answer.errorReason == reason, "\(path): \(answer.jsonString)")
            let records = supervisor.skipRecords()
            #expect(records.count == index + 1, "one record per skip")
            guard let record = records.last else { continue }
            #expect(record["reason"]?.stringValue == reason)
            #expect(record["path"]?.stringValue == path)
            #expect(record["tag"]?.stringValue == "job-\(index)")
            #expect(record["client_pid"]?.intValue == Int(getpid()))
            #expect(record["client_uid"]?.intValue == Int(getuid()))
            #expect(record["request_id"] != nil && record["elapsed_ms"] != nil && record["deadline_ms"] != nil)
            #expect(Timestamp.parseRFC3339(record["ts"]?.stringValue ?? "") != nil)
            for key in ["size", "mtime", "detail"] { #expect(record[key] != nil, "missing \(key)") }
            if reason != "not_found" { #expect(record["size"]?.intValue != nil, "\(reason): size unknown") }
        }
        // Caller outcomes are counted, not logged.
        _ = try client.decode(goodClip, ["fps": "x"])
        #expect(supervisor.skipRecords().count == cases.count)
    }

    @Test func theRecordIsOnDiskBeforeTheAnswer() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        let (answer, _) = try supervisor.client().decode(fixtures.file("gone.mp4"))
        #expect(answer.errorReason == "not_found")
        supervisor.stop(signal: SIGKILL)  // No chance to flush anything after answering.
        let records = supervisor.skipRecords()
        #expect(records.count == 1)
        #expect(records.first?["path"]?.stringValue == fixtures.file("gone.mp4"))
    }

    @Test func quarantineAfterACrashAfterTwoTimeoutsNotAfterOneAndItSurvivesARestart() throws {
        let environment = [WorkerMessage.faultEnvironmentKey: "crash-on=CRASHME,hang-on=HANGME"]
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"], environment: environment)
        let client = try supervisor.client()
        let crashing = try copy("q-CRASHME.mp4")
        #expect(try client.decode(crashing).0.errorReason == "crashed")
        let repeated = try client.decode(crashing).0
        #expect(repeated.errorReason == "quarantined")
        #expect(repeated["error"]?["message"]?.stringValue?.contains("crashed") == true, "\(repeated.jsonString)")

        let hanging = try copy("q-HANGME.mp4")
        #expect(try client.decode(hanging, ["deadline_ms": 300]).0.errorReason == "timeout")
        #expect(try client.decode(hanging, ["deadline_ms": 300]).0.errorReason == "timeout", "one timeout must not quarantine")
        // Answered without a worker: a dispatched clip would hang for its whole 10 s deadline.
        let started = Date()
        #expect(try client.decode(hanging, ["deadline_ms": 10_000]).0.errorReason == "quarantined")
        #expect(Date().timeIntervalSince(started) < 5)
        #expect(supervisor.skipRecords().count == 3, "quarantine repeats are not logged")

        // A restart rebuilds the quarantine from the log.
        supervisor.stop()
        let restarted = try SupervisorProcess(arguments: ["--workers", "1"], environment: environment, directory: supervisor.directory)
        #expect(try restarted.client().decode(crashing).0.errorReason == "quarantined")
        #expect(try restarted.client().decode(hanging, ["deadline_ms": 300]).0.errorReason == "quarantined")

        // A changed file is decoded again (this one no longer crashes once its name is not the trigger...
        // so change its content instead: append bytes, which changes size and mtime).
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: crashing))
        handle.seekToEndOfFile()
        handle.write(Data(repeating: 0, count: 16))
        try handle.close()
        #expect(try restarted.client().decode(crashing).0.errorReason == "crashed", "a changed file must be tried again")
    }

    /// With `after_refused_media = "keep"` a worker stays after media it refused, so a later
    /// crash of it may be that media's doing (test fault `poison-on`: refused, and the worker
    /// crashes on its next clip; one worker, no spare, so both clips meet it). The clip it
    /// crashed on is decoded again on a fresh worker, answered ok, and neither logged nor
    /// quarantined; the log names the refused clip.
    @Test func aCrashAfterRefusedMediaIsRetriedOnAFreshWorkerBeforeItIsBlamed() throws {
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1", "--spare-workers", "0", "--after-refused-media", "keep"],
            environment: [WorkerMessage.faultEnvironmentKey: "poison-on=POISON"])
        let client = try supervisor.client()
        let poison = try copy("p-POISON.mp4")
        #expect(try client.decode(poison).0.errorReason == "decode_error")
        let worker = try #require(supervisor.status()["workers"]?["list"]?.arrayValue?.first)
        #expect(worker["refused_media"]?.stringValue == poison, "\(worker.jsonString)")
        #expect(worker["clips_done"]?.intValue == 1, "the worker stays after media it refused")
        #expect(StatusReport.render(try supervisor.status()).contains("(stayed after refusing \(poison))"))

        let (answer, block) = try client.decode(goodClip, ["fps": 2])
        #expect(answer["ok"] == true && block?.isEmpty == false, "\(answer.jsonString)")
        let counters = try supervisor.status()["counters"]
        #expect(counters?["crashes"]?.intValue == 1 && counters?["crash_retries"]?.intValue == 1, "\(counters?.jsonString ?? "")")
        #expect(StatusReport.render(try supervisor.status()).contains("crashes 1 (1 retried on a fresh worker)"))
        #expect(supervisor.skipRecords().map { $0["path"]?.stringValue } == [poison], "only the refused clip is a skip")
        #expect(try client.decode(goodClip, ["fps": 2]).0["ok"] == true, "the innocent clip is not quarantined")
        #expect(supervisor.stderr.contains("most likely left behind by \(poison)"), "\(supervisor.stderr.suffix(2000))")
    }

    /// A clip that crashes a worker that had refused media, and then crashes a fresh worker too,
    /// is the crash's cause: answered `crashed` once, logged once, quarantined.
    @Test func aClipThatAlsoCrashesAFreshWorkerIsBlamed() throws {
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1", "--spare-workers", "0", "--after-refused-media", "keep"],
            environment: [WorkerMessage.faultEnvironmentKey: "crash-on=CRASHME"])
        let client = try supervisor.client()
        let damaged = Corpus.path("mp4parse-rust__chunk_out_of_range.mp4")
        #expect(try client.decode(damaged).0.errorReason == "decode_error")
        let crashing = try copy("b-CRASHME.mp4")
        let (answer, _) = try client.decode(crashing)
        #expect(answer.errorReason == "crashed", "\(answer.jsonString)")
        let counters = try supervisor.status()["counters"]
        #expect(counters?["crashes"]?.intValue == 2 && counters?["crash_retries"]?.intValue == 1, "\(counters?.jsonString ?? "")")
        let records = supervisor.skipRecords()
        #expect(records.map { $0["reason"]?.stringValue } == ["decode_error", "crashed"], "one record for the crash")
        #expect(try client.decode(crashing).0.errorReason == "quarantined")
    }

    /// By default (DESIGN.md) refused media replaces its worker: nothing is suspect, so a crash
    /// is blamed at once, and the poisoned worker never reaches the next clip.
    @Test func byDefaultRefusedMediaReplacesTheWorker() throws {
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1", "--spare-workers", "0"], environment: [WorkerMessage.faultEnvironmentKey: "poison-on=POISON"])
        let client = try supervisor.client()
        #expect(try client.decode(try copy("d-POISON.mp4")).0.errorReason == "decode_error")
        #expect(try client.decode(goodClip, ["fps": 2]).0["ok"] == true)
        let status = try supervisor.status()
        #expect(status["counters"]?["crashes"]?.intValue == 0 && status["counters"]?["crash_retries"]?.intValue == 0)
        #expect(status["workers"]?["list"]?.arrayValue?.allSatisfy { $0["refused_media"] == .null } == true)
    }

    @Test func quarantineIsRebuiltFromRotatedAndCompressedLogs() throws {
        let environment = [WorkerMessage.faultEnvironmentKey: "crash-on=CRASHME"]
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"], environment: environment)
        let crashing = try copy("r-CRASHME.mp4")
        #expect(try supervisor.client().decode(crashing).0.errorReason == "crashed")
        supervisor.stop()
        // What logrotate leaves behind: the old log renamed and compressed, no live file.
        try FileManager.default.moveItem(atPath: supervisor.skipLogPath, toPath: supervisor.skipLogPath + ".1")
        #expect(try Fixtures.run("/usr/bin/gzip", [supervisor.skipLogPath + ".1"]) == 0)
        let restarted = try SupervisorProcess(arguments: ["--workers", "1"], environment: environment, directory: supervisor.directory)
        #expect(try restarted.client().decode(crashing).0.errorReason == "quarantined")
    }

    @Test func quarantineExpiresAndForgetLiftsIt() throws {
        let environment = [WorkerMessage.faultEnvironmentKey: "crash-on=CRASHME"]
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1", "--quarantine-expiry", "2s"], environment: environment)
        let client = try supervisor.client()
        let crashing = try copy("e-CRASHME.mp4")
        #expect(try client.decode(crashing).0.errorReason == "crashed")
        #expect(try client.decode(crashing).0.errorReason == "quarantined")
        sleep(2)
        #expect(try client.decode(crashing).0.errorReason == "crashed", "the entry expired")

        #expect(try client.decode(crashing).0.errorReason == "quarantined")
        let forget = Process()
        forget.executableURL = URL(fileURLWithPath: Binaries.supervisor)
        forget.arguments = ["skips", "--forget", crashing, "--socket", supervisor.socketPath, "--skip-log", supervisor.skipLogPath]
        forget.standardOutput = FileHandle.nullDevice
        try forget.run()
        forget.waitUntilExit()
        #expect(forget.terminationStatus == 0)
        #expect(try client.decode(crashing).0.errorReason == "crashed", "--forget lifted the quarantine")
        #expect(supervisor.skipRecords().contains { $0["event"]?.stringValue == "forget" && $0["path"]?.stringValue == crashing })
    }

    @Test func sighupAfterARenameStartsANewFileAndSkipsReadsBoth() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        let client = try supervisor.client()
        _ = try client.decode(fixtures.file("first-missing.mp4"))
        try FileManager.default.moveItem(atPath: supervisor.skipLogPath, toPath: supervisor.skipLogPath + ".1")
        kill(supervisor.pid, SIGHUP)
        // Reopening creates the file afresh; wait for that rather than for a fixed time.
        let reopenedBy = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: supervisor.skipLogPath), Date() < reopenedBy { usleep(20_000) }
        #expect(FileManager.default.fileExists(atPath: supervisor.skipLogPath), "SIGHUP did not reopen the skip log")
        _ = try client.decode(fixtures.file("second-missing.mp4"))
        #expect(supervisor.skipRecords().count == 1, "the new file holds only the new record")

        let skips = Process()
        skips.executableURL = URL(fileURLWithPath: Binaries.supervisor)
        skips.arguments = ["skips", "--json", "--skip-log", supervisor.skipLogPath]
        let pipe = Pipe()
        skips.standardOutput = pipe
        try skips.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        skips.waitUntilExit()
        let lines = output.split(separator: "\n")
        #expect(lines.count == 2)
        #expect(lines.first?.contains("second-missing") == true, "newest first")
        #expect(lines.last?.contains("first-missing") == true)

        // The table view, filtered.
        let table = Process()
        table.executableURL = URL(fileURLWithPath: Binaries.supervisor)
        table.arguments = ["skips", "--reason", "not_found", "--since", "1h", "--path", fixtures.file("first-*"), "--skip-log", supervisor.skipLogPath]
        let tablePipe = Pipe()
        table.standardOutput = tablePipe
        try table.run()
        let text = String(decoding: tablePipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        table.waitUntilExit()
        #expect(text.contains("1 skips") && text.contains("not_found 1") && text.contains("first-missing") && !text.contains("second-missing"), "\(text)")
    }

    @Test func anUnwritableLogIsReportedAndDecodingContinues() throws {
        let directory = TemporaryDirectory("rolog")
        let readOnly = directory.file("ro")
        try FileManager.default.createDirectory(atPath: readOnly, withIntermediateDirectories: true)
        chmod(readOnly, 0o555)
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1", "--skip-log", "\(readOnly)/skips.jsonl"], directory: directory,
            asUser: getuid() == 0 ? "65534" : nil)
        let client = try supervisor.client()
        let (answer, _) = try client.decode(directory.file("missing.mp4"))
        #expect(answer.errorReason == "not_found")
        let status = try supervisor.status()
        #expect(status["skip_log"]?["healthy"]?.boolValue == false)
        #expect(supervisor.stderr.contains("NOT being recorded"), "\(supervisor.stderr)")
        let clip = directory.file("ok.mp4")
        try FileManager.default.copyItem(atPath: goodClip, toPath: clip)
        chmod(clip, 0o644)
        #expect(try client.decode(clip).0["ok"]?.boolValue == true)
    }
}
