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
        let queued = try supervisor.status()["queue"]?["clients"]?.arrayValue ?? []
        #expect(queued.first?["pid"]?.intValue == Int(getpid()) && (queued.first?["queued"]?.intValue ?? 0) >= 20, "\(queued)")

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
