import Foundation
import Synchronization
import Shared
import Testing

@testable import Supervisor

/// Many clients on one supervisor (8 GPUs × 8 DataLoader workers): dispatch is fair across
/// connections, and the supervisor takes them all.
@Suite(.serialized, .timeLimit(.minutes(3)))
final class FairnessTests {
    let fixtures = TemporaryDirectory("fairness")
    var clip: String { fixtures.file("small.mp4") }
    static let small: [String: JSONValue] = ["frames": 2, "width": 64, "height": 48]

    init() throws {
        try Fixtures.clip(at: clip, seconds: 1)
    }

    /// One client's 24-clip sample is queued first; another client's single clip is answered
    /// after a couple of the sample's clips, not after all of them (a global FIFO made it wait
    /// for the whole sample).
    @Test func aBigSampleDoesNotHoldBackAnotherClientsSingleClip() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--spare-workers", "1"])
        let heavy = try supervisor.client()
        let light = try supervisor.client()
        var item = Self.small
        item["path"] = .string(clip)
        try heavy.send([
            "op": "sample", "id": .number(Double(heavy.makeID())), "all_or_nothing": false,
            "clips": .array(Array(repeating: .object(item), count: 24)),
        ])
        #expect(supervisor.waitForStatus { ($0["queue"]?["length"]?.intValue ?? 0) >= 20 })
        let clients = try supervisor.status()["clients"]?.arrayValue ?? []
        let deepest = clients.max { ($0["queued"]?.intValue ?? 0) < ($1["queued"]?.intValue ?? 0) }
        #expect(deepest?["pid"]?.intValue == Int(getpid()) && (deepest?["queued"]?.intValue ?? 0) >= 20, "\(clients)")

        let (answer, _) = try light.decode(clip, Self.small)
        #expect(answer["ok"]?.boolValue == true, "\(answer.jsonString)")
        let decodedBefore = try supervisor.status()["counters"]?["decoded"]?.intValue ?? 99
        #expect(decodedBefore <= 5, "the single clip waited for \(decodedBefore - 1) of the sample's clips")

        // The sample itself completes: 24 clip answers and its done.
        var clips = 0
        var done: JSONValue?
        while done == nil {
            let (message, fd) = try heavy.receive(timeoutMs: 60_000)
            try? fd?.close()
            if message["done"]?.boolValue == true { done = message } else { clips += 1 }
        }
        #expect(clips == 24 && done?["ok"]?.boolValue == true)
    }

    /// 64 clients at once, each with its own connection: all say hello and decode, with no
    /// `overloaded`, at default settings.
    @Test func sixtyFourClientsAtOnceAreAllServed() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "2"])
        let results = Mutex<[String]>([])
        let socketPath = supervisor.socketPath, path = clip
        DispatchQueue.concurrentPerform(iterations: 64) { index in
            let outcome: String
            do {
                let client = try SupervisorClient.connect(candidates: [socketPath], timeoutMs: 20_000)
                let (answer, fd) = try client.call(
                    Self.small.merging(["op": "decode", "path": .string(path), "tag": .string("client-\(index)")]) { a, _ in a },
                    timeoutMs: 120_000)
                try? fd?.close()
                outcome = answer["ok"]?.boolValue == true ? "ok" : (answer.errorReason ?? "?")
            } catch {
                outcome = "error: \(error)"
            }
            results.withLock { $0.append(outcome) }
        }
        let outcomes = results.withLock { $0 }
        #expect(outcomes.count == 64)
        #expect(outcomes.allSatisfy { $0 == "ok" }, "\(outcomes.filter { $0 != "ok" })")
        #expect(try supervisor.status()["counters"]?["decoded"]?.intValue == 64)
    }
}

/// A slot is CPU: a worker blocked in I/O uses none, so its slot is lent to the next clip; a
/// worker spinning on the CPU keeps it. Deadlines do not change.
@Suite(.serialized, .timeLimit(.minutes(3)))
final class StallTests {
    let fixtures = TemporaryDirectory("stall")
    var clip: String { fixtures.file("small.mp4") }

    init() throws {
        try Fixtures.clip(at: clip, seconds: 1)
    }

    private func fifo(_ name: String) -> String {
        let path = fixtures.file(name)
        Fixtures.fifo(at: path)
        return path
    }

    /// Two clips blocked on FIFOs with a 6 s deadline hold both slots of `--workers 2`; four good
    /// clips sent next are answered long before those deadlines (they waited 6 s before).
    @Test func clipsBlockedInIODoNotHoldTheirSlots() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "2", "--spare-workers", "0"])
        let hanging = try supervisor.client()
        let fifos = [fifo("a.fifo"), fifo("b.fifo")]
        for path in fifos {
            try hanging.send(["op": "decode", "id": .number(Double(hanging.makeID())), "path": .string(path), "deadline_ms": 6000])
        }
        #expect(supervisor.waitForStatus(timeout: 5) { $0["workers"]?["stalled"]?.intValue == 2 }, "both FIFO workers are seen blocked")
        let listed = try supervisor.status()["workers"]?["list"]?.arrayValue ?? []
        #expect(listed.filter { $0["stalled"]?.boolValue == true }.count == 2)

        let good = try supervisor.client()
        let started = Date()
        for _ in 0..<4 {
            let (answer, _) = try good.decode(clip, ["frames": 2, "width": 64, "height": 48])
            #expect(answer["ok"]?.boolValue == true, "\(answer.jsonString)")
        }
        let waited = Date().timeIntervalSince(started)
        #expect(waited < 4.5, "good clips waited \(waited) s behind blocked ones (deadline 6 s)")
        let status = try supervisor.status()
        #expect((status["workers"]?["live"]?.intValue ?? 99) <= status["workers"]?["max"]?.intValue ?? 0)

        // The blocked clips still time out at their deadline, and the skip log says "stalled".
        for _ in fifos {
            let (answer, _) = try hanging.receive(timeoutMs: 15_000)
            #expect(answer.errorReason == "timeout")
            #expect(answer["error"]?["detail"]?.stringValue == "stalled", "\(answer.jsonString)")
            #expect(answer["error"]?["message"]?.stringValue?.contains("blocked") == true)
            let elapsed = answer["elapsed_ms"]?.intValue ?? 0
            #expect(elapsed >= 6000 && elapsed < 7500, "deadline kept: \(elapsed) ms")
        }
        #expect(supervisor.skipRecords().filter { $0["detail"]?.stringValue?.contains("[stalled]") == true }.count == 2)
    }

    /// A decoder spinning on the CPU really uses its slot: it is not lent, and its timeout says
    /// "busy" (a codec problem, not storage).
    @Test func aSpinningDecoderKeepsItsSlot() throws {
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1", "--spare-workers", "1"],
            environment: [WorkerMessage.faultEnvironmentKey: "hang-on=spin-"])
        let spinning = fixtures.file("spin-clip.mp4")
        try Fixtures.clip(at: spinning, seconds: 1)
        let client = try supervisor.client()
        let spinID = client.makeID()
        try client.send(["op": "decode", "id": .number(Double(spinID)), "path": .string(spinning), "deadline_ms": 2500])
        #expect(supervisor.waitUntilAWorkerIsBusy())
        usleep(800_000)  // several CPU samples
        #expect(try supervisor.status()["workers"]?["stalled"]?.intValue == 0)
        let started = Date()
        let (answer, _) = try supervisor.client().decode(clip, ["frames": 2, "width": 64, "height": 48])
        #expect(answer["ok"]?.boolValue == true)
        #expect(Date().timeIntervalSince(started) > 1.0, "the good clip waited for the only slot")
        let (spin, _) = try client.receive(timeoutMs: 10_000)
        #expect(spin.errorReason == "timeout" && spin["error"]?["detail"]?.stringValue == "busy", "\(spin.jsonString)")
    }

    /// Blocked workers never push the processes past --max-workers: at the cap, clips queue.
    @Test func theCapBoundsWorkerProcesses() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--spare-workers", "0", "--max-workers", "3"])
        let client = try supervisor.client()
        for index in 0..<5 {
            try client.send([
                "op": "decode", "id": .number(Double(client.makeID())), "path": .string(fifo("cap\(index).fifo")),
                "deadline_ms": 4000,
            ])
        }
        var most = 0
        let until = Date().addingTimeInterval(3)
        while Date() < until {
            let status = try supervisor.status()
            let processes = supervisor.workerProcesses().count
            most = max(most, processes)
            #expect((status["workers"]?["live"]?.intValue ?? 0) <= 3)
            usleep(50_000)
        }
        #expect(most <= 3, "\(most) worker processes with --max-workers 3")
        #expect(most == 3, "blocked workers did lend their slots up to the cap")
        #expect((try supervisor.status()["queue"]?["length"]?.intValue ?? 0) >= 2, "the rest wait at the cap")
    }
}
