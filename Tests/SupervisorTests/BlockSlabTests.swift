import Foundation
import Shared
import SystemPackage
import Testing

@testable import Supervisor

/// Block slabs (docs/protocol.md, "Block slabs") against the real supervisor: blocks land in a
/// few reused memfds, byte for byte the blocks a fresh memfd gets; a slab is never lent while a
/// worker may write into it or its client may read it; limits send blocks to fresh memfds.
@Suite(.serialized, .timeLimit(.minutes(5)))
final class BlockSlabTests {
    let fixtures = TemporaryDirectory("slab-fixtures")
    var goodClip: String { fixtures.file("good.mp4") }

    init() throws {
        try Fixtures.clip(at: goodClip)
    }

    /// A client's view of its slabs: the fds that came with the first block in each.
    final class Slabs {
        var fds: [Int: FileDescriptor] = [:]
        deinit { for fd in fds.values { try? fd.close() } }

        /// The tensors of an answer's block, read from its slab (taking the slab's fd if it came).
        func tensors(_ answer: JSONValue, _ fd: FileDescriptor?) throws -> [[UInt8]] {
            guard let index = answer["slab"]?["index"]?.intValue, let bytes = answer["block_bytes"]?.intValue else {
                throw HarnessError("no block in a slab: \(answer.jsonString)")
            }
            if let fd {
                #expect(answer["slab"]?["attached"]?.boolValue == true)
                #expect(!SharedMemory.isSealed(fd), "a slab is writable")
                #expect(SharedMemory.isSealedAgainstShrinking(fd), "a slab is sealed against shrinking")
                fds[index] = fd
            }
            guard let slab = fds[index] else { throw HarnessError("slab \(index) came without its fd: \(answer.jsonString)") }
            let mapped = try MappedFile(fd: slab)
            #expect(mapped.bytes.count >= bytes)
            return try BlockReader.read(UnsafeRawBufferPointer(rebasing: mapped.bytes[0..<bytes])).1
        }
    }

    func tensorsOfFreshMemfd(_ fd: FileDescriptor?) throws -> [[UInt8]] {
        guard let fd else { throw HarnessError("no block fd") }
        defer { try? fd.close() }
        #expect(SharedMemory.isSealed(fd))
        let mapped = try MappedFile(fd: fd)
        return try BlockReader.read(mapped.bytes).1
    }

    /// Decodes the good clip until its block comes in a slab (a worker that died is reaped a
    /// moment after its clip's answer, and only then gives its slab back), up to `tries` times;
    /// returns the last answer. `meanwhile` takes each block that came in a fresh memfd.
    func decodeUntilInSlab(
        _ client: SupervisorClient, _ slabs: Slabs, tries: Int, meanwhile: (FileDescriptor?) throws -> Void
    ) throws -> JSONValue {
        var answer: JSONValue = .null
        for _ in 0..<tries {
            let (next, fd) = try client.call(["op": "decode", "path": .string(goodClip), "frames": 2], timeoutMs: 60_000)
            answer = next
            if next["slab"] != nil {
                _ = try slabs.tensors(next, fd)
                break
            }
            try meanwhile(fd)
            usleep(20_000)
        }
        return answer
    }

    @Test func blocksGoIntoReusedSlabsAndEqualFreshMemfdBlocks() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "2"])
        let client = try supervisor.client(slabs: 2)
        #expect(client.hello["slabs"]?.intValue == 2)
        let plainClient = try supervisor.client()
        #expect(plainClient.hello["slabs"]?.intValue == 0)
        let slabs = Slabs()
        let options: [[String: JSONValue]] = [["fps": 4, "max_pixels": 50176], ["fps": 30], ["frames": 2, "max_pixels": 20000]]
        var expected: [[[UInt8]]] = []
        for option in options {
            var request = option
            request["op"] = "decode"
            request["path"] = .string(goodClip)
            let (answer, fd) = try plainClient.call(request, timeoutMs: 60_000)
            #expect(answer["slab"] == nil, "a client that asked for no slabs gets fresh memfds")
            expected.append(try tensorsOfFreshMemfd(fd))
        }
        func decode(_ which: Int, releasing: [Int] = []) throws -> JSONValue {
            var request = options[which]
            request["op"] = "decode"
            request["path"] = .string(goodClip)
            if !releasing.isEmpty { request["release_slabs"] = .array(releasing.map { .number(Double($0)) }) }
            let (answer, fd) = try client.call(request, timeoutMs: 60_000)
            #expect(answer["ok"]?.boolValue == true, "\(answer.jsonString)")
            #expect(try slabs.tensors(answer, fd) == expected[which], "clip \(which) in a slab differs from a fresh memfd's block")
            return answer
        }
        // Unreleased, the first slab is not lent again: the second block gets a new slab.
        #expect(try decode(0)["slab"]?["index"]?.intValue == 0)
        #expect(try decode(1)["slab"]?["index"]?.intValue == 1)
        // Both held: a block goes to a fresh memfd.
        let (third, thirdFD) = try client.call(["op": "decode", "path": .string(goodClip), "frames": 2], timeoutMs: 60_000)
        #expect(third["ok"]?.boolValue == true && third["slab"] == nil, "\(third.jsonString)")
        _ = try tensorsOfFreshMemfd(thirdFD)
        // Released with the next request, the slab takes the next block, which comes without an fd.
        let reused = try decode(2, releasing: [1])
        #expect(reused["slab"]?["index"]?.intValue == 1 && reused["slab"]?["attached"]?.boolValue == false)
        // A larger block than the slab held before grows it.
        let grown = try decode(1, releasing: [1, 0])
        #expect(grown["slab"]?["index"]?.intValue == 0)

        let status = try client.status(within: 1) { _ in true }
        #expect(status["memory"]?["slabs"]?["count"]?.intValue == 2, "\(status["memory"]?.jsonString ?? "")")
        #expect(StatusReport.render(status).contains("block slabs: 2 holding "), "\(StatusReport.render(status))")
        let metrics = try client.call(["op": "metrics"], timeoutMs: 5000).0["text"]?.stringValue ?? ""
        #expect(metrics.contains("\nclipvisor_block_slabs 2"), "\(metrics.split(separator: "\n").filter { $0.contains("slab") })")
        let mine = status["clients"]?.arrayValue?.first { $0["slabs"]?.intValue == 2 }
        #expect(mine?["slabs_delivered"]?.intValue == 1, "slab 0 holds the last block, not released yet")

        // Releasing what the client does not hold is refused, and releases nothing.
        let (twice, _) = try client.call(["op": "status", "release_slabs": [1]], timeoutMs: 5000)
        #expect(twice.errorReason == "invalid_request" && twice["error"]?["detail"]?.stringValue == "release_slabs", "\(twice.jsonString)")
        let (unknown, _) = try client.call(["op": "status", "release_slabs": [0, 7]], timeoutMs: 5000)
        #expect(unknown.errorReason == "invalid_request", "\(unknown.jsonString)")
        let (sample, _) = try client.call(["op": "sample", "release_slabs": ["x"], "clips": [["path": .string(goodClip)]]], timeoutMs: 5000)
        #expect(sample["done"]?.boolValue == true && sample.errorReason == "invalid_request", "\(sample.jsonString)")
        let after = try client.status(within: 1) { _ in true }
        let stillMine = after["clients"]?.arrayValue?.first { $0["slabs"]?.intValue == 2 }
        #expect(stillMine?["slabs_delivered"]?.intValue == 1)
        // A `release` request of its own frees them at once.
        let (released, _) = try client.call(["op": "release", "release_slabs": [0]], timeoutMs: 5000)
        #expect(released["ok"]?.boolValue == true, "\(released.jsonString)")
        let (stray, _) = try client.call(["op": "release", "slabs": [0]], timeoutMs: 5000)
        #expect(stray.errorReason == "invalid_request" && stray["error"]?["detail"]?.stringValue == "slabs", "\(stray.jsonString)")
        let freed = try client.status(within: 1) { _ in true }
        #expect(freed["clients"]?.arrayValue?.first { $0["slabs"]?.intValue == 2 }?["slabs_delivered"]?.intValue == 0)
    }

    /// A slab is lent to one worker at a time and only back once that worker is done with it:
    /// while a worker hangs on a FIFO with the connection's only slab, other clips get fresh
    /// memfds; once it is killed at its deadline the slab serves again.
    @Test func aSlabIsNotLentAgainWhileItsWorkerLives() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "2"])
        let client = try supervisor.client(slabs: 1)
        let fifo = fixtures.file("hang.fifo")
        Fixtures.fifo(at: fifo)
        let hangID = client.makeID()
        try client.send(["op": "decode", "id": .number(Double(hangID)), "path": .string(fifo), "deadline_ms": 1500])
        #expect(supervisor.waitUntilAWorkerIsBusy())
        let (during, duringFD) = try client.call(["op": "decode", "path": .string(goodClip), "frames": 2], timeoutMs: 60_000)
        #expect(during["ok"]?.boolValue == true && during["slab"] == nil, "the only slab is with the hanging worker: \(during.jsonString)")
        _ = try tensorsOfFreshMemfd(duringFD)
        var hang: JSONValue = .null
        while hang["id"]?.intValue != hangID { hang = try client.receive(timeoutMs: 10_000).0 }
        #expect(hang.errorReason == "timeout", "\(hang.jsonString)")
        // The killed worker is reaped a moment after its timeout answer.
        let answer = try decodeUntilInSlab(client, Slabs(), tries: 50) { fd in try? fd?.close() }
        #expect(answer["slab"]?["index"]?.intValue == 0, "the slab serves again once its worker is gone: \(answer.jsonString)")
    }

    /// A worker that crashes, or breaks the protocol, with the connection's only slab: the clip
    /// is answered with its error, and the slab serves the next clips once the worker is gone.
    @Test func aSlabComesBackFromAWorkerThatCrashedOrLied() throws {
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1"], environment: [WorkerMessage.faultEnvironmentKey: "lie-on=LIAR,crash-on=CRASHME"])
        let client = try supervisor.client(slabs: 1)
        let slabs = Slabs()
        for fault in ["LIAR", "CRASHME"] {
            let copy = try fixtures.copy(of: goodClip, as: "\(fault).mp4")
            let (failed, failedFD) = try client.call(["op": "decode", "path": .string(copy), "frames": 2], timeoutMs: 60_000)
            #expect(failed["ok"]?.boolValue == false && failedFD == nil, "\(failed.jsonString)")
            let answer = try decodeUntilInSlab(client, slabs, tries: 100) { fd in _ = try tensorsOfFreshMemfd(fd) }
            #expect(answer["slab"]?["index"]?.intValue == 0, "after \(fault): \(answer.jsonString)")
            let (_, _) = try client.call(["op": "status", "release_slabs": [0]], timeoutMs: 5000)
        }
    }

    /// The memory limit and the per-slab size: a block that cannot fit gets a fresh memfd (the
    /// worker moves it out before writing), a small one still goes into a slab; a disconnect
    /// frees the connection's slabs.
    @Test func blocksThatDoNotFitGetFreshMemfdsAndADisconnectFreesTheSlabs() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "2", "--block-slab-memory", "2000000"])
        let slabs = Slabs()
        do {
            let client = try supervisor.client(slabs: 4)
            let (large, largeFD) = try client.call(["op": "decode", "path": .string(goodClip), "fps": 30], timeoutMs: 60_000)
            #expect(large["ok"]?.boolValue == true && large["slab"] == nil, "13.8 MB of frames exceed the 2 MB limit: \(large.jsonString.prefix(600))")
            _ = try tensorsOfFreshMemfd(largeFD)
            let (small, smallFD) = try client.call(["op": "decode", "path": .string(goodClip), "frames": 2, "max_pixels": 20000], timeoutMs: 60_000)
            #expect(small["slab"]?["index"]?.intValue == 0, "\(small.jsonString)")
            _ = try slabs.tensors(small, smallFD)
            let held = try client.status(within: 1) { _ in true }
            #expect(held["memory"]?["slabs"]?["count"]?.intValue == 1)
        }
        let observer = try supervisor.client()
        let freed = try observer.status(within: 5) { $0["memory"]?["slabs"]?["count"]?.intValue == 0 }
        #expect(freed["memory"]?["slabs"]?["count"]?.intValue == 0, "a closed connection's slabs are closed")
    }

    @Test func slabsAreOffWithBlockSlabsZeroAndAHelloAskingTooManyIsRefused() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--block-slabs", "0"])
        let client = try supervisor.client(slabs: 4)
        #expect(client.hello["slabs"]?.intValue == 0)
        #expect(StatusReport.render(try supervisor.status()).contains("block slabs: off"))
        let (answer, fd) = try client.call(["op": "decode", "path": .string(goodClip), "frames": 2], timeoutMs: 60_000)
        #expect(answer["ok"]?.boolValue == true && answer["slab"] == nil)
        _ = try tensorsOfFreshMemfd(fd)
        #expect(throws: SupervisorClient.Failure.self) { try supervisor.client(slabs: 17) }
    }
}
