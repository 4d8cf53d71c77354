import Foundation
import Shared
import SystemPackage
import Testing

@testable import Supervisor

/// The supervisor with real workers on real files: decoding, hard deadlines, faults, and that
/// nothing leaks after any of them.
@Suite(.serialized, .timeLimit(.minutes(5)))
final class SupervisorTests {
    let fixtures = TemporaryDirectory("fixtures")
    var goodClip: String { fixtures.file("good.mp4") }

    init() throws {
        try Fixtures.clip(at: goodClip)
    }

    @Test func decodesAClipAndTheBytesEqualTheWorkersOwnDecode() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "2"])
        let client = try supervisor.client()
        let (answer, block) = try client.decode(goodClip, ["fps": 4, "max_pixels": 50176])
        #expect(answer["ok"]?.boolValue == true, "\(answer.jsonString)")
        let result = answer["result"]
        #expect(result?["video"]?["shape"]?.arrayValue?.count == 4)
        #expect(result?["video"]?["pts"]?.arrayValue?.count == 8)

        let out = fixtures.file("direct.block")
        let status = try Fixtures.run(Binaries.worker, ["decode", goodClip, "--fps", "4", "--max-pixels", "50176", "--out", out])
        #expect(status == 0)
        let direct = try [UInt8](Data(contentsOf: URL(fileURLWithPath: out)))
        let (_, viaSupervisor) = try block!.withUnsafeBytes { try BlockReader.read($0) }
        let (_, viaWorker) = try direct.withUnsafeBytes { try BlockReader.read($0) }
        #expect(viaSupervisor == viaWorker, "tensors differ between the supervisor and the worker CLI")
    }

    /// One caller on an idle pool: the lone clip gets the idle slots (a conversion thread and
    /// frame threads) when it wants most frames, never when the request chose `threads` or the
    /// selection is sparse, and the frames are the same either way.
    @Test func aLoneDenseClipGetsTheIdleSlotsAsThreads() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "3"])
        let client = try supervisor.client()
        let threads = { (answer: JSONValue) in answer["result"]?["video"]?["decoder_threads"]?.intValue }
        let staged = { (answer: JSONValue) in answer["result"]?["video"]?["conversion_thread"]?.boolValue }
        let (dense, denseBlock) = try client.decode(goodClip, ["fps": 30])
        #expect(dense["ok"]?.boolValue == true, "\(dense.jsonString)")
        #expect(threads(dense) == 2 && staged(dense) == true,
                "all 60 frames of an idle 3-slot pool: \(dense["result"]?["video"]?.jsonString ?? "")")
        let (chosen, chosenBlock) = try client.decode(goodClip, ["fps": 30, "threads": 1])
        #expect(threads(chosen) == 1 && staged(chosen) == false, "the request's threads are kept")
        let (sparse, _) = try client.decode(goodClip, ["fps": 2])
        #expect(threads(sparse) == 1 && staged(sparse) == false, "4 of 60 frames: no frame threads")
        let tensors = { (block: [UInt8]?) throws in try #require(block).withUnsafeBytes { try BlockReader.read($0).1 } }
        #expect(try tensors(denseBlock) == tensors(chosenBlock), "the threads changed the frames")

    }

    /// Slots held by other clips are not idle: two spinning decoders (they use their CPU, so
    /// their slots are not lent) leave the third clip one thread on a 3-slot pool.
    @Test func busySlotsAreNotGivenAsThreads() throws {
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "3"], environment: [WorkerMessage.faultEnvironmentKey: "spin-on=SPINME"])
        let spinner = try fixtures.copy(of: goodClip, as: "budget-SPINME.mp4")
        let busy = try supervisor.client()
        for id in 1...2 {
            try busy.send(["op": "decode", "id": .number(Double(id)), "path": .string(spinner), "deadline_ms": 4000, "threads": 1])
        }
        #expect(supervisor.waitForStatus { ($0["workers"]?["list"]?.arrayValue ?? []).filter { $0["state"] == "busy" }.count == 2 })
        let (answer, _) = try supervisor.client().decode(goodClip, ["fps": 30])
        #expect(answer["ok"]?.boolValue == true)
        #expect(answer["result"]?["video"]?["decoder_threads"]?.intValue == 1, "\(answer["result"]?["video"]?.jsonString ?? "")")
    }

    @Test func hangingClipsTimeOutOnTimeWhileOtherClipsAreAnswered() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "3"])
        let baseline = supervisor.settledFDCount()
        let fifo = fixtures.file("hang.fifo")
        Fixtures.fifo(at: fifo)
        let stalled = fixtures.file("stalled.fifo")
        Fixtures.fifo(at: stalled)
        // A writer that sends the start of a real file, then stalls with the FIFO open.
        let head = (try? Data(contentsOf: URL(fileURLWithPath: goodClip)).prefix(4096)) ?? Data()
        let writer = Thread {
            let fd = open(stalled, O_WRONLY)
            guard fd >= 0 else { return }
            _ = head.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            sleep(6)
            close(fd)
        }
        writer.start()

        let client = try supervisor.client()
        let deadline = 2500
        let started = Date()
        let ids = [
            client.makeID(), client.makeID(), client.makeID(),
        ]
        try client.send(["op": "decode", "id": .number(Double(ids[0])), "path": .string(fifo), "deadline_ms": .number(Double(deadline))])
        try client.send(["op": "decode", "id": .number(Double(ids[1])), "path": .string(stalled), "deadline_ms": .number(Double(deadline))])
        try client.send(["op": "decode", "id": .number(Double(ids[2])), "path": .string(goodClip), "fps": 2])
        var answers: [Int: (JSONValue, Double)] = [:]
        while answers.count < 3 {
            let (answer, fd) = try client.receive(timeoutMs: 10_000)
            try? fd?.close()
            answers[answer["id"]!.intValue!] = (answer, Date().timeIntervalSince(started))
        }
        #expect(answers[ids[2]]!.0["ok"]?.boolValue == true)
        #expect(answers[ids[2]]!.1 < Double(deadline) / 1000 - 0.5, "the good clip waited for the hung ones")
        for id in ids[0..<2] {
            let (answer, seconds) = answers[id]!
            #expect(answer.errorReason == "timeout", "\(answer.jsonString)")
            // Deadline + 100 ms is the product's bar; tests on shared machines allow more.
            #expect(seconds * 1000 < Double(deadline) + 600, "answered after \(seconds) s")
            #expect(seconds * 1000 >= Double(deadline) - 5)
        }
        // An over-long decode (a real clip, tiny deadline) is a timeout too.
        let long = fixtures.file("long.mp4")
        try Fixtures.clip(at: long, seconds: 8, size: "1280x720")
        let (answer, _) = try client.decode(long, ["fps": 30, "max_frames": 300, "deadline_ms": 200])
        #expect(answer.errorReason == "timeout")
        try supervisor.expectClean(baselineFDs: baseline + 1)
        #expect(supervisor.skipRecords().filter { $0["reason"]?.stringValue == "timeout" }.count == 3)
    }

    @Test func badFilesGetTheirReasons() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "2"])
        let baseline = supervisor.settledFDCount()
        let client = try supervisor.client()
        let cases: [(String, String)] = [
            (fixtures.file("missing.mp4"), "not_found"),
            (fixtures.path, "unsupported"),
            (Corpus.path("jcodec__fr.vp8"), "unsupported"),
            (Corpus.path("mp4parse-rust__chunk_out_of_range.mp4"), "decode_error"),
            (Corpus.path("mathiasbynens-small__Mpeg4.mp4"), "unsupported"),
            (Corpus.path("libwebm__invalid_vp9_bitstream-bug_1416.webm"), "too_large"),
        ]
        for (path, reason) in cases {
            let (answer, block) = try client.decode(path)
            #expect(answer.errorReason == reason, "\(path): \(answer.jsonString)")
            #expect(block == nil)
            let message = answer["error"]?["message"]?.stringValue ?? ""
            #expect(message.contains(path), "the message does not name the file: \(message)")
        }
        try supervisor.expectClean(baselineFDs: baseline + 1)
    }

    @Test func unreadableFileIsAPermissionSkip() throws {
        let directory = TemporaryDirectory("perm")
        let locked = directory.file("locked.mp4")
        try FileManager.default.copyItem(atPath: goodClip, toPath: locked)
        chmod(locked, 0o000)
        // Root reads anything: run the supervisor as nobody then.
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1"], directory: directory, asUser: getuid() == 0 ? "65534" : nil)
        let (answer, _) = try supervisor.client().decode(locked)
        #expect(answer.errorReason == "permission", "\(answer.jsonString)")
    }

    @Test func aClipPassedAsAnFDDecodesWhereTheSupervisorCannotSeeIt() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        let hidden = TemporaryDirectory("hidden")
        let path = hidden.file("clip.mp4")
        try FileManager.default.copyItem(atPath: goodClip, toPath: path)
        let fd = try FileDescriptor.open(path, .readOnly)
        defer { try? fd.close() }
        unlink(path)  // No path leads to it any more; only the fd does.
        let client = try supervisor.client()
        let (answer, block) = try client.call(
            ["op": "decode", "fd": true, "path": .string(path), "frames": 4], passing: fd, timeoutMs: 30_000)
        defer { try? block?.close() }
        #expect(answer["ok"]?.boolValue == true, "\(answer.jsonString)")
        #expect(answer["result"]?["video"]?["pts"]?.arrayValue?.count == 4)
        // Without the fd the same path is simply missing.
        #expect(try client.decode(path).0.errorReason == "not_found")
        // An fd without a path is named by its file's identity, not by a reusable fd number.
        let junk = hidden.file("junk.bin")
        #expect(FileManager.default.createFile(atPath: junk, contents: Data(repeating: 7, count: 4096)))
        let junkFD = try FileDescriptor.open(junk, .readOnly)
        defer { try? junkFD.close() }
        var info = stat()
        fstat(junkFD.rawValue, &info)
        let (failed, _) = try client.call(["op": "decode", "fd": true, "frames": 4], passing: junkFD, timeoutMs: 30_000)
        #expect(failed["ok"]?.boolValue == false)
        #expect(failed["error"]?["message"]?.stringValue?.contains("fd:dev=\(info.st_dev),ino=\(info.st_ino)") == true, "\(failed.jsonString)")
    }

    /// An fd belongs to the message it came with: one a refused message carried is closed, never
    /// handed to the next message (which would then decode another file than the one it sent).
    @Test func anFDIsNeverHandedToALaterMessage() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        let baseline = supervisor.settledFDCount()
        let other = fixtures.file("other.mp4")
        try Fixtures.clip(at: other, seconds: 1, size: "64x48")
        let first = try FileDescriptor.open(goodClip, .readOnly)
        let second = try FileDescriptor.open(other, .readOnly)
        defer { try? first.close(); try? second.close() }
        let client = try supervisor.client()
        // Refused for its id, and large enough to take several reads, with the next message
        // queued right behind it (the supervisor is stopped while both are sent).
        let padding: [JSONValue] = (0..<9000).map { .number(Double($0) / 1000 + 0.0001) }
        kill(supervisor.pid, SIGSTOP)
        try client.send(
            ["op": "decode", "id": .number(9_007_199_254_740_992), "fd": true, "path": .string(goodClip), "timestamps": .array(padding)],
            passing: first)
        try client.send(["op": "probe", "id": 7, "fd": true, "path": .string(other)], passing: second)
        kill(supervisor.pid, SIGCONT)
        var probe: JSONValue?
        for _ in 0..<2 {
            let (answer, fd) = try client.receive(timeoutMs: 30_000)
            try? fd?.close()
            if answer["id"]?.intValue == 7 { probe = answer }
        }
        let size = try #require(try FileManager.default.attributesOfItem(atPath: other)[.size] as? Int)
        #expect(probe?["ok"]?.boolValue == true, "\(probe?.jsonString ?? "no answer")")
        #expect(probe?["probe"]?["size_bytes"]?.intValue == size, "probed another file: \(probe?.jsonString ?? "")")
        #expect(probe?["probe"]?["source"]?["width"]?.intValue == 64, "\(probe?.jsonString ?? "")")
        try supervisor.expectClean(baselineFDs: baseline + 1)
    }

    /// A client that sends an fd with every byte of one long message cannot fill the
    /// supervisor's fd table: it keeps at most one per message.
    @Test func fdsSentWithEveryByteDoNotPileUp() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        let baseline = supervisor.settledFDCount()
        let clip = try FileDescriptor.open(goodClip, .readOnly)
        defer { try? clip.close() }
        let socket = try UnixSocket.connect(to: supervisor.socketPath)
        defer { try? socket.close() }
        try SocketIO.sendAll(socket, MessageFraming.frame(["op": "hello", "protocol": 1]) + [0x00, 0x10, 0x00, 0x00])
        for _ in 0..<200 {
            _ = try [UInt8(ascii: " ")].withUnsafeBytes { try SocketIO.send(socket, $0, passing: clip) }
        }
        usleep(300_000)
        #expect(supervisor.openFDs().count <= baseline + 2, "fds: \(supervisor.openFDs())")
        #expect(try supervisor.client().call(["op": "status"], timeoutMs: 5000).0["ok"]?.boolValue == true)
    }

    /// A client that only writes requests and never reads is throttled (its requests stop
    /// being read once answers pile up), other clients are served meanwhile, and when it reads,
    /// every request it managed to send is answered.
    @Test func aClientThatNeverReadsIsThrottledAndLosesNothing() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        let socket = try UnixSocket.connect(to: supervisor.socketPath)
        defer { try? socket.close() }
        try SocketIO.sendAll(socket, MessageFraming.frame(["op": "hello", "protocol": 1]))
        var sent = 0
        var stalledAt: Date?
        let limit = 50_000
        while sent < limit {
            let request = MessageFraming.frame(["op": "cancel", "id": .number(Double(sent + 1)), "target": 999_999_999])
            let n = try? request.withUnsafeBytes { try SocketIO.send(socket, $0, nonBlocking: true) }
            if let n {
                #expect(n == request.count, "a partial request write")
                sent += 1
                stalledAt = nil
                continue
            }
            // Would block: give the supervisor time to read more, if it still reads.
            if stalledAt == nil { stalledAt = Date() } else if Date().timeIntervalSince(stalledAt!) > 1 { break }
            usleep(20_000)
        }
        #expect(sent < limit, "the supervisor kept reading a client that reads nothing")
        #expect(try supervisor.client().call(["op": "status"], timeoutMs: 5000).0["ok"]?.boolValue == true)
        var inbox = MessageBuffer()
        var answered = 0
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        let hello = 1
        while answered < sent + hello {
            guard try SocketIO.waitReadable(socket, timeoutMs: 10_000) else { break }
            let got = try buffer.withUnsafeMutableBytes { try SocketIO.receive(socket, into: $0) }
            guard got.count > 0 else { break }
            buffer.withUnsafeBytes { inbox.append(UnsafeRawBufferPointer(rebasing: $0[0..<got.count])) }
            while try inbox.next() != nil { answered += 1 }
        }
        #expect(answered == sent + hello, "\(answered - hello) of \(sent) requests answered")
    }

    @Test func aWorkerKilledBySignalAnswersCrashedAndIsReplaced() throws {
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1"], environment: [WorkerMessage.faultEnvironmentKey: "crash-on=CRASHME"])
        let baseline = supervisor.settledFDCount()
        let crashing = fixtures.file("CRASHME.mp4")
        try? FileManager.default.copyItem(atPath: goodClip, toPath: crashing)
        let client = try supervisor.client()
        let (answer, _) = try client.decode(crashing)
        #expect(answer.errorReason == "crashed")
        #expect(answer["error"]?["message"]?.stringValue?.contains("SIGSEGV") == true, "\(answer.jsonString)")
        #expect(try client.decode(goodClip).0["ok"]?.boolValue == true)
        try supervisor.expectClean(baselineFDs: baseline + 1)
    }

    /// A worker's messages are untrusted: absurd numbers and a success without its block get
    /// the clip answered `crashed` and the worker replaced; the supervisor itself carries on.
    @Test func aLyingWorkerIsKilledAndItsClipAnswered() throws {
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1"], environment: [WorkerMessage.faultEnvironmentKey: "lie-on=LIAR"])
        let lying = fixtures.file("LIAR.mp4")
        try? FileManager.default.copyItem(atPath: goodClip, toPath: lying)
        let client = try supervisor.client()
        let (answer, block) = try client.decode(lying, ["deadline_ms": 20_000], timeoutMs: 10_000)
        #expect(answer.errorReason == "crashed", "\(answer.jsonString)")
        #expect(answer["error"]?["message"]?.stringValue?.contains("without its block") == true, "\(answer.jsonString)")
        #expect(block == nil)
        #expect(try client.decode(goodClip).0["ok"]?.boolValue == true, "the supervisor and a new worker carry on")
    }

    /// A block sent to a client that does not read stays on the memory budget (its memfd lives
    /// on in the socket queue): no further clip starts until the client reads.
    @Test func blocksAClientHasNotReadStayOnTheBudget() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--memory-budget", "500000"])
        let client = try supervisor.client()
        let ids = (0..<3).map { _ in client.makeID() }
        for id in ids {
            try client.send(["op": "decode", "id": .number(Double(id)), "path": .string(goodClip), "frames": 4])
        }
        // One 4-frame 320x240 block (~850 kB) spends the budget; the other two wait.
        let stalled = supervisor.waitForStatus { status in
            (status["memory"]?["block_bytes_held"]?.intValue ?? 0) > 500_000 && status["queue"]?["length"]?.intValue == 2
        }
        #expect(stalled, "\((try? supervisor.status())?.jsonString ?? "")")
        usleep(300_000)
        #expect(try supervisor.status()["queue"]?["length"]?.intValue == 2, "a clip started though the budget was spent")
        var answered: Set<Int> = []
        while answered.count < 3 {
            let (answer, fd) = try client.receive(timeoutMs: 30_000)
            try? fd?.close()
            #expect(answer["ok"]?.boolValue == true, "\(answer.jsonString)")
            answered.insert(answer["id"]?.intValue ?? -1)
        }
        #expect(answered == Set(ids))
        #expect(supervisor.waitForStatus { $0["memory"]?["block_bytes_held"]?.intValue == 0 })
    }

    @Test func aFullQueueAnswersOverloaded() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--queue-limit", "1"])
        let fifo = fixtures.file("overload.fifo")
        Fixtures.fifo(at: fifo)
        let client = try supervisor.client()
        var hanging: [Int] = []
        for _ in 0..<2 {
            let id = client.makeID()
            hanging.append(id)
            try client.send(["op": "decode", "id": .number(Double(id)), "path": .string(fifo), "deadline_ms": 10_000])
        }
        // One hangs in the worker, one waits: the queue is now full. Observed, not slept on.
        let full = supervisor.waitForStatus { status in
            status["queue"]?["length"]?.intValue == 1
        } && supervisor.waitUntilAWorkerIsBusy()
        #expect(full, "expected one busy worker and one queued clip: \((try? supervisor.status())?.jsonString ?? "no status")")
        let (answer, _) = try client.decode(goodClip, timeoutMs: 5000)
        #expect(answer.errorReason == "overloaded", "\(answer.jsonString)")
        #expect(answer["error"]?["retry_after_ms"]?.intValue != nil, "\(answer.jsonString)")
        for id in hanging { try client.send(["op": "cancel", "id": .number(Double(client.makeID())), "target": .number(Double(id))]) }
    }

    /// Requests that arrive in one read must not be refused because the clip before them
    /// has not been handed to its idle worker yet: only clips that really wait count.
    @Test func clipsThatGoStraightToAnIdleWorkerDoNotCountAgainstTheQueue() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "2", "--queue-limit", "1"])
        #expect(supervisor.waitUntilPoolIsIdle())
        let client = try supervisor.client()
        // Two clips for two idle workers plus one that waits: exactly the limit, all accepted.
        let id = client.makeID()
        try client.send([
            "op": "sample", "id": .number(Double(id)), "frames": 4,
            "clips": [["path": .string(goodClip)], ["path": .string(goodClip)], ["path": .string(goodClip)]],
        ])
        var delivered = 0
        while true {
            let (answer, fd) = try client.receive(timeoutMs: 30_000)
            try? fd?.close()
            if answer["done"]?.boolValue == true {
                #expect(answer["ok"]?.boolValue == true, "\(answer.jsonString)")
                break
            }
            if answer["ok"]?.boolValue == true { delivered += 1 }
        }
        #expect(delivered == 3)
    }

    /// An answer at the frame limit (every frame's pts and index) travels back from the worker,
    /// and a request at it travels there, though it is larger than a socket buffer carries by
    /// default; one past the limit is refused naming the field. No worker is lost, nothing is
    /// counted as a crash.
    @Test func theLargestRequestAndAnswerFitTheWorkerChannel() throws {
        let defaultDatagramLimit = 212_992
        let limit = DecodeOptions.maxFramesPerClip
        let long = fixtures.file("ten-thousand-frames.mp4")
        try Fixtures.clip(at: long, seconds: Double(limit) / 30 + 1, size: "32x32", rate: 30)
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        let client = try supervisor.client()

        let (answer, block) = try client.decode(long, ["frames": .number(Double(limit))], timeoutMs: 120_000)
        #expect(answer["ok"]?.boolValue == true, "\(String(answer.jsonString.prefix(400)))")
        #expect(answer["result"]?["video"]?["pts"]?.arrayValue?.count == limit)
        #expect(block != nil)

        // Times below 1e-4 print in exponent form, the longest JSON numbers a client sends.
        let times: [JSONValue] = (0..<limit).map { .number(1e-5 * (1 + Double($0) / 10_007)) }
        #expect(JSONValue.array(times).serialized().count > defaultDatagramLimit)
        let (atLimit, _) = try client.decode(goodClip, ["timestamps": .array(times), "width": 16, "height": 16], timeoutMs: 120_000)
        #expect(atLimit["ok"]?.boolValue == true, "\(String(atLimit.jsonString.prefix(400)))")

        let tooMany = try client.decode(goodClip, ["timestamps": .array(times + [.number(0)])]).0
        #expect(tooMany.errorReason == "invalid_request")
        #expect(tooMany["error"]?["detail"]?.stringValue == "timestamps", "\(tooMany.jsonString)")
        let counters = try supervisor.status()["counters"]
        #expect(counters?["crashes"]?.intValue == 0)
        #expect(counters?["spawns"]?.intValue == 3, "no worker was replaced: \(counters?.jsonString ?? "")")
    }

    @Test func allOrNothingSampleFailsWholeAndNamesTheClip() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "2"])
        let baseline = supervisor.settledFDCount()
        let client = try supervisor.client()
        let missing = fixtures.file("absent.mp4")
        let id = client.makeID()
        try client.send([
            "op": "sample", "id": .number(Double(id)), "frames": 4,
            "clips": [["path": .string(goodClip)], ["path": .string(missing)], ["path": .string(goodClip)], ["path": .string(goodClip)]],
        ])
        var clipAnswers: [Int: JSONValue] = [:]
        var done: JSONValue?
        while done == nil {
            let (answer, fd) = try client.receive(timeoutMs: 30_000)
            try? fd?.close()
            #expect(answer["id"]?.intValue == id)
            if answer["done"]?.boolValue == true { done = answer } else { clipAnswers[answer["clip"]!.intValue!] = answer }
        }
        #expect(clipAnswers.count == 4, "every clip is answered exactly once")
        #expect(done?["ok"]?.boolValue == false)
        #expect(done?["clip"]?.intValue == 1)
        #expect(done?["error"]?["reason"]?.stringValue == "not_found")
        #expect(done?["error"]?["message"]?.stringValue?.contains("absent.mp4") == true)
        for (clip, answer) in clipAnswers where clip != 1 {
            #expect(answer["ok"]?.boolValue == true || answer.errorReason == "cancelled")
        }
        // Without all-or-nothing every good clip is delivered.
        let second = client.makeID()
        try client.send([
            "op": "sample", "id": .number(Double(second)), "frames": 4, "all_or_nothing": false,
            "clips": [["path": .string(goodClip)], ["path": .string(missing)], ["path": .string(goodClip)]],
        ])
        var ok = 0
        while true {
            let (answer, fd) = try client.receive(timeoutMs: 30_000)
            try? fd?.close()
            if answer["done"]?.boolValue == true { break }
            if answer["ok"]?.boolValue == true { ok += 1 }
        }
        #expect(ok == 2)
        try supervisor.expectClean(baselineFDs: baseline + 1)
    }

    @Test func malformedRequestsAreAnsweredAndNothingLeaks() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        let baseline = supervisor.settledFDCount()
        let client = try supervisor.client()
        let bad: [(JSONValue, String)] = [
            (["op": "decode", "id": 1, "path": .string(goodClip), "fps": "fast"], "fps"),
            (["op": "decode", "id": 2, "path": "relative.mp4"], "path"),
            (["op": "decode", "id": 3, "path": .string(goodClip), "colour": "red"], "colour"),
            (["op": "decode", "id": 4, "path": .string(goodClip), "width": 100], "height"),
            (["op": "decode", "id": 5, "path": .string(goodClip), "deadline_ms": 1e12], "deadline_ms"),
            (["op": "explode", "id": 6], "op"),
            (["op": "decode", "id": 7, "fd": true], "fd"),
            (["op": "sample", "id": 8, "clips": []], "clips"),
            (["op": "decode", "id": 9, "path": .string(goodClip), "width": 30_000, "height": 10], "width"),
            (["op": "decode", "id": 10, "path": .string(goodClip), "frames": 10_001], "frames"),
        ]
        for (message, field) in bad {
            try client.send(message)
            let (answer, _) = try client.receive(timeoutMs: 5000)
            #expect(answer.errorReason == "invalid_request", "\(message.jsonString) → \(answer.jsonString)")
            #expect(answer["error"]?["message"]?.stringValue?.contains(field) == true, "\(answer.jsonString)")
        }
        // Raw garbage on fresh connections: random bytes, truncated JSON, a 100 MB length prefix.
        var generator = SystemRandomNumberGenerator()
        let garbage: [[UInt8]] = [
            (0..<64).map { _ in UInt8.random(in: 0...255, using: &generator) },
            MessageFraming.frame(["op": "hello", "protocol": 1]) + [20, 0, 0, 0] + Array("{\"op\":\"deco".utf8),
            MessageFraming.frame(["op": "hello", "protocol": 1]) + [0x00, 0xE1, 0xF5, 0x05],
            MessageFraming.frame(["op": "hello", "protocol": 1]) + MessageFraming.frame(["op": "decode", "id": 9, "path": .string(goodClip)]),
        ]
        for bytes in garbage {
            let fd = try UnixSocket.connect(to: supervisor.socketPath)
            try SocketIO.sendAll(fd, bytes)
            usleep(100_000)
            try fd.close()  // Disconnect mid-request.
        }
        try supervisor.expectClean(baselineFDs: baseline + 1)
    }

    @Test func aDisconnectCancelsRunningWorkAndTheWorkerIsReplaced() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        let baseline = supervisor.settledFDCount()
        let fifo = fixtures.file("disconnect.fifo")
        Fixtures.fifo(at: fifo)
        do {
            let client = try supervisor.client()
            try client.send(["op": "decode", "id": 1, "path": .string(fifo), "deadline_ms": 60_000])
            #expect(supervisor.waitUntilAWorkerIsBusy(), "the hanging clip never reached a worker")
        }
        // The client is gone; its hung clip must not keep the only worker.
        let (answer, _) = try supervisor.client().decode(goodClip, timeoutMs: 10_000)
        #expect(answer["ok"]?.boolValue == true)
        let status = try supervisor.status()
        #expect(status["counters"]?["skipped"]?["cancelled"]?.intValue == 1)
        try supervisor.expectClean(baselineFDs: baseline + 1)
    }

    @Test func sigtermDrainsAndRemovesTheSocket() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--grace", "1"])
        let fifo = fixtures.file("drain.fifo")
        Fixtures.fifo(at: fifo)
        let client = try supervisor.client()
        try client.send(["op": "decode", "id": 1, "path": .string(fifo), "deadline_ms": 60_000])
        #expect(supervisor.waitUntilAWorkerIsBusy(), "the hanging clip never reached a worker")
        let workerPIDs = supervisor.children().map(\.pid)
        let started = Date()
        #expect(supervisor.stop() == 0)
        #expect(Date().timeIntervalSince(started) < 5)
        let (answer, _) = try client.receive(timeoutMs: 1000)
        #expect(answer.errorReason == "cancelled")
        #expect(!FileManager.default.fileExists(atPath: supervisor.socketPath))
        for pid in workerPIDs { #expect(kill(pid, 0) != 0, "worker \(pid) outlived the supervisor") }
    }

    /// A supervisor that exits removes its own socket file only, not one a newer supervisor has
    /// put at the same path since.
    @Test func atExitOnlyItsOwnSocketFileIsRemoved() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"])
        unlink(supervisor.socketPath)
        #expect(FileManager.default.createFile(atPath: supervisor.socketPath, contents: Data("newer".utf8)))
        #expect(supervisor.stop() == 0)
        #expect(FileManager.default.fileExists(atPath: supervisor.socketPath), "the newer file was removed")
    }

    @Test func refusesASocketALiveSupervisorOwnsAndReplacesAStaleOne() throws {
        let first = try SupervisorProcess(arguments: ["--workers", "1"])
        let second = Process()
        second.executableURL = URL(fileURLWithPath: Binaries.supervisor)
        second.arguments = ["serve", "--socket", first.socketPath, "--skip-log", first.skipLogPath]
        let pipe = Pipe()
        second.standardError = pipe
        try second.run()
        second.waitUntilExit()
        #expect(second.terminationStatus != 0)
        let message = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(message.contains("already serving"), "\(message)")

        first.stop(signal: SIGKILL)  // Leaves a stale socket file behind.
        #expect(FileManager.default.fileExists(atPath: first.socketPath))
        let third = try SupervisorProcess(arguments: ["--workers", "1"], directory: first.directory)
        #expect(try third.client().decode(goodClip).0["ok"]?.boolValue == true)
    }

    @Test func aMissingWorkerBinaryIsRefusedAtStartAndADyingOneBacksOff() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Binaries.supervisor)
        process.arguments = ["serve", "--socket", fixtures.file("nw.sock"), "--worker", "/nonexistent/clipvisor-worker"]
        let pipe = Pipe()
        process.standardError = pipe
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus != 0)
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(text.contains("/nonexistent/clipvisor-worker"))

        // A worker that dies at start: the supervisor backs off instead of spinning.
        let directory = TemporaryDirectory("dying")
        let dying = SupervisorProcessLauncher.start(
            directory: directory, arguments: ["--workers", "2"],
            environment: [WorkerMessage.faultEnvironmentKey: "exit-at-start"])
        sleep(3)
        let client = try SupervisorClient.connect(candidates: [directory.file("s.sock")])
        let status = try client.call(["op": "status"], timeoutMs: 5000).0["status"]
        let failures = status?["counters"]?["spawn_failures"]?.intValue ?? 0
        #expect(failures >= 3 && failures <= 16, "\(failures) start failures in 3 s")
        let (answer, _) = try client.decode(goodClip, timeoutMs: 5000)
        #expect(answer.errorReason == "overloaded")
        #expect(answer["error"]?["message"]?.stringValue?.contains("no decode worker can start") == true)
        #expect(answer["error"]?["detail"]?.stringValue == "no_workers", "clients must be told not to wait")
        kill(dying.processIdentifier, SIGKILL)
        dying.waitUntilExit()
    }
}

/// Starts a supervisor without waiting for its pool (for supervisors that cannot get ready).
enum SupervisorProcessLauncher {
    static func start(directory: TemporaryDirectory, arguments: [String], environment: [String: String]) -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Binaries.supervisor)
        process.arguments = ["serve", "--socket", directory.file("s.sock"), "--skip-log", directory.file("skips.jsonl")] + arguments
        var env = ProcessInfo.processInfo.environment
        for (key, value) in environment { env[key] = value }
        process.environment = env
        process.standardError = FileHandle.nullDevice
        try? process.run()
        usleep(300_000)
        return process
    }
}
