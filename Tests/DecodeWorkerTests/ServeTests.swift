import Foundation
import Shared
import SystemPackage
import Testing

@testable import DecodeWorker

/// `clipvisor-worker serve` over a real socketpair, as the supervisor drives it.
@Suite(.serialized, .timeLimit(.minutes(5)))
struct ServeTests {
    /// A spawned worker with our end of its control socket.
    final class Worker {
        let pid: pid_t
        let control: SystemPackage.FileDescriptor
        private var reaped: Int32?

        init(_ extra: [String] = [], faults: String? = nil) throws {
            var fds: [Int32] = [0, 0]
            guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
                throw Errno(rawValue: errno)
            }
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            defer { posix_spawn_file_actions_destroy(&actions) }
            posix_spawn_file_actions_adddup2(&actions, fds[1], 3)
            let args = [Support.worker, "serve", "--control-fd", "3", "--parent-pid", "\(getpid())"] + extra
            var env = ProcessInfo.processInfo.environment
            env[WorkerMessage.faultEnvironmentKey] = faults
            let cArgs = args.map { strdup($0) } + [nil]
            let cEnv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
            defer { (cArgs + cEnv).forEach { free($0) } }
            var child: pid_t = 0
            let rc = posix_spawn(&child, Support.worker, &actions, nil, cArgs, cEnv)
            close(fds[1])
            guard rc == 0 else { close(fds[0]); throw Errno(rawValue: rc) }
            pid = child
            control = SystemPackage.FileDescriptor(rawValue: fds[0])
        }

        deinit {
            if reaped == nil { kill(pid, SIGKILL); _ = wait() }
            closeControl()
        }

        private var controlClosed = false

        /// Closes our end once. A second close could hit the same number reused meanwhile by
        /// another suite's socket (suites run in parallel in this process).
        func closeControl() {
            guard !controlClosed else { return }
            controlClosed = true
            try? control.close()
        }

        /// Next message within `timeout` seconds (nil on timeout or end of stream), with its fd.
        /// `started` messages are collected in `started` rather than returned.
        func receive(timeout: Double = 60) throws -> (JSONValue, SystemPackage.FileDescriptor?)? {
            while true {
                guard try SocketIO.waitReadable(control, timeoutMs: Int32(timeout * 1000)) else { return nil }
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: WorkerMessage.maxSize, alignment: 16)
                defer { buffer.deallocate() }
                let r = try SocketIO.receive(control, into: buffer)
                if r.count == 0 { return nil }
                let message = try JSONValue.parse(UnsafeRawBufferPointer(rebasing: buffer[0..<r.count]))
                if message["op"] == "started" {
                    started.append(message)
                    continue
                }
                return (message, r.fd)
            }
        }

        /// The `started` messages received so far (size and mtime of each job's file).
        var started: [JSONValue] = []

        func send(_ message: JSONValue, fd: SystemPackage.FileDescriptor? = nil) throws {
            let bytes = message.serialized()
            _ = try bytes.withUnsafeBytes { try SocketIO.send(control, $0, passing: fd) }
        }

        /// Waits for the exit; returns (exit code, signal).
        func wait(timeout: Double = 30) -> (code: Int32?, signal: Int32?) {
            let deadline = Date().addingTimeInterval(timeout)
            var status: Int32 = 0
            while Date() < deadline {
                let r = waitpid(pid, &status, WNOHANG)
                if r == pid {
                    reaped = status
                    let sig = status & 0x7F
                    return sig == 0 ? ((status >> 8) & 0xFF, nil) : (nil, sig)
                }
                usleep(5_000)
            }
            return (nil, nil)
        }
    }

    @Test func readyDecodeProbeAndRecycle() throws {
        let clip = try EngineTests.fixture.get()
        let w = try Worker(["--max-clips", "3", "--address-space-mb", "4096", "--cpu-seconds", "120", "--open-files", "256"])
        let (ready, _) = try #require(try w.receive())
        #expect(ready["op"] == "ready")
        #expect(ready["pid"]?.intValue == Int(w.pid))
        #expect(ready["protocol"]?.intValue == ClipvisorVersion.workerProtocol)
        #expect((ready["landlock"]?.intValue ?? -1) >= 0)
        #expect(ready["thread"] == nil, "an exec'd worker serves from its first thread: \(ready.jsonString)")

        try w.send(["op": "probe", "job": 1, "path": .string(clip)])
        let (probe, _) = try #require(try w.receive())
        #expect(probe["op"] == "done" && probe["job"] == 1 && probe["ok"] == true && probe["exiting"] == false)
        #expect(probe["probe"]?["streams"]?.arrayValue?.count == 2)

        // The clip travels as an fd (a client in another mount namespace); the path is only a name.
        let file = try SystemPackage.FileDescriptor.open(clip, .readOnly)
        defer { try? file.close() }
        try w.send(["op": "decode", "job": 2, "path": "client-name.mp4", "fd": true, "options": ["frames": 4, "layout": "THWC"]], fd: file)
        let (done, blockFD) = try #require(try w.receive())
        #expect(done["ok"] == true && done["job"] == 2 && done["exiting"] == false)
        let block = try #require(blockFD)
        defer { try? block.close() }
        #expect(SharedMemory.isSealed(block))
        #expect(try SharedMemory.size(of: block) == done["block_bytes"]?.intValue)
        let mapped = try MappedFile(fd: block)
        let (header, tensors) = try BlockReader.read(mapped.bytes)
        #expect(tensors[0].count == 4 * 240 * 320 * 3)
        #expect(header.result["path"] == "client-name.mp4")
        #expect(done["result"] == nil, "the result travels once, in the block's header")
        #expect(try BlockReader.header(of: block, blockBytes: mapped.bytes.count) == header)
        let size = try #require(try? FileManager.default.attributesOfItem(atPath: clip)[.size] as? Int)
        #expect(w.started.map { $0["job"]?.intValue } == [1, 2])
        #expect(w.started.allSatisfy { $0["size"]?.intValue == size && $0["mtime"]?.doubleValue != nil })

        // Third job reaches --max-clips: the reply says exiting and the worker exits 0.
        try w.send(["op": "probe", "job": 3, "path": .string(clip)])
        let (last, _) = try #require(try w.receive())
        #expect(last["exiting"] == true)
        #expect(w.wait().code == 0)
    }

    /// A file that could not be opened never reached a demuxer: the worker stays (a dataset with
    /// many missing files must not pay a worker start for each). Media that FFmpeg refused
    /// replaces it, in case the media left state behind, unless the job says
    /// `stay_after_refused_media`: then it stays and decodes the next clip exactly as a fresh
    /// worker does. Running out of memory replaces it either way.
    @Test func missingFilesKeepTheWorkerRefusedMediaOnlyWhenAskedOutOfMemoryNever() throws {
        let clip = try EngineTests.fixture.get()
        let options: JSONValue = ["fps": 2, "max_pixels": 20000]
        let fresh = try Worker()
        _ = try #require(try fresh.receive())
        try fresh.send(["op": "decode", "job": 1, "path": .string(clip), "options": options])
        let (freshReply, freshFD) = try #require(try fresh.receive())
        #expect(freshReply["ok"] == true)
        let freshBlockFD = try #require(freshFD)
        defer { try? freshBlockFD.close() }
        let freshBlock = try Support.readBlock(freshBlockFD)

        let w = try Worker(["--address-space-mb", "1024"], faults: "oom-on=OOMME")
        _ = try #require(try w.receive())
        try w.send(["op": "decode", "job": 9, "path": "/nonexistent/clip.mp4", "options": [:]])
        let (reply, fd) = try #require(try w.receive())
        #expect(fd == nil)
        #expect(reply["ok"] == false && reply["exiting"] == false)
        #expect(reply["error"]?["reason"] == "not_found")
        #expect(reply["error"]?["path"] == "/nonexistent/clip.mp4")
        #expect(w.started.first?["size"] == .null, "a missing file has no size")

        let garbage = try Support.temporaryDirectory() + "/garbage.mp4"
        try Data((0..<65_536).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 7) }).write(to: URL(fileURLWithPath: garbage))
        try w.send(["op": "decode", "job": 10, "path": .string(garbage), "options": [:], "stay_after_refused_media": true])
        let (failed, _) = try #require(try w.receive())
        #expect(failed["ok"] == false && failed["exiting"] == false, "\(failed.jsonString)")
        #expect(failed["error"]?["reason"] == "decode_error" || failed["error"]?["reason"] == "unsupported")

        try w.send(["op": "decode", "job": 11, "path": .string(clip), "options": options])
        let (after, afterFD) = try #require(try w.receive())
        #expect(after["ok"] == true && after["exiting"] == false, "\(after.jsonString)")
        let afterBlockFD = try #require(afterFD)
        defer { try? afterBlockFD.close() }
        #expect(try Support.readBlock(afterBlockFD) == freshBlock, "a worker that refused media decodes like a fresh one")

        let oomClip = try Support.temporaryDirectory() + "/OOMME.mp4"
        try FileManager.default.copyItem(atPath: clip, toPath: oomClip)
        try w.send(["op": "decode", "job": 12, "path": .string(oomClip), "options": options, "stay_after_refused_media": true])
        let (oom, _) = try #require(try w.receive())
        #expect(oom["error"]?["reason"] == "out_of_memory" && oom["exiting"] == true, "\(oom.jsonString)")
        #expect(w.wait().code == 0)

        // Without the flag (DESIGN.md's rule), refused media replaces the worker.
        let strict = try Worker()
        _ = try #require(try strict.receive())
        try strict.send(["op": "decode", "job": 1, "path": .string(garbage), "options": [:]])
        let (refused, _) = try #require(try strict.receive())
        #expect(refused["ok"] == false && refused["exiting"] == true, "\(refused.jsonString)")
        #expect(strict.wait().code == 0)
    }

    @Test func closedSocketAndMalformedMessages() throws {
        let w = try Worker()
        _ = try #require(try w.receive())
        w.closeControl()
        #expect(w.wait().code == 0)
        let m = try Worker()
        _ = try #require(try m.receive())
        let junk: [UInt8] = Array("{not json".utf8)
        _ = try junk.withUnsafeBytes { try SocketIO.send(m.control, $0) }
        #expect(m.wait().code == 76)
        let usage = try Support.run([Support.worker, "serve", "--parent-pid", "1", "--max-clips", "0"])
        #expect(usage.status == 64)
        // A worker whose supervisor is already gone (wrong parent pid) refuses to start.
        let wrongParent = try Support.run([Support.worker, "serve", "--parent-pid", "1"])
        #expect(wrongParent.status == 71)
    }

    /// The fork server (`serve --fork-server`): a clone speaks the worker protocol on the socket
    /// that came with the request and is the requester's child (CLONE_PARENT), not the fork
    /// server's; a request without a socket is refused alone; a malformed one ends it (76).
    @Test func forkServerClonesWorkersForItsParent() throws {
        let clip = try EngineTests.fixture.get()
        let server = try Worker(["--fork-server", "--max-clips", "2"])
        let (ready, _) = try #require(try server.receive())
        #expect(ready["op"] == "fork_server_ready" && ready["pid"]?.intValue == Int(server.pid), "\(ready.jsonString)")

        try server.send(ForkServerMessage.fork(request: 1).json)
        let (refused, _) = try #require(try server.receive())
        #expect(try ForkServerMessage(json: refused) == .failed(request: 1, message: "no control socket came with the request"))

        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
        let ours = SystemPackage.FileDescriptor(rawValue: fds[0])
        defer { try? ours.close() }
        try server.send(ForkServerMessage.fork(request: 2).json, fd: SystemPackage.FileDescriptor(rawValue: fds[1]))
        close(fds[1])
        let (forkedMessage, _) = try #require(try server.receive())
        guard case .forked(2, let pid) = try ForkServerMessage(json: forkedMessage) else {
            Issue.record("no clone: \(forkedMessage.jsonString)")
            return
        }
        var reaped = false
        defer { if !reaped { kill(pid, SIGKILL); var status: Int32 = 0; waitpid(pid, &status, 0) } }

        // The clone: ready with its own pid, one job, then --max-clips ends it with code 0.
        var buffer = [UInt8](repeating: 0, count: WorkerMessage.maxSize)
        func receive() throws -> JSONValue? {
            while try SocketIO.waitReadable(ours, timeoutMs: 60_000) {
                let r = try buffer.withUnsafeMutableBytes { try SocketIO.receive(ours, into: $0) }
                try? r.fd?.close()
                if r.count == 0 { return nil }
                let message = try JSONValue.parse(buffer[0..<r.count])
                if message["op"] != "started" { return message }
            }
            return nil
        }
        let workerReady = try #require(try receive())
        #expect(workerReady["op"] == "ready" && workerReady["pid"]?.intValue == Int(pid), "\(workerReady.jsonString)")
        // Checked once it is ready: it sets up its process group right after the clone.
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        let fields = stat[stat.index(stat.lastIndex(of: ")")!, offsetBy: 2)...].split(separator: " ")
        #expect(pid_t(fields[1]) == getpid(), "the clone's parent is not the requester")
        #expect(pid_t(fields[2]) == pid, "the clone does not lead its own process group")
        // It serves from a thread of its own (ForkServer.swift says why), which ready names; its
        // first thread waits for that one.
        let thread = try #require(workerReady["thread"]?.intValue.map { pid_t($0) }, "\(workerReady.jsonString)")
        #expect(thread != pid)
        #expect(FileManager.default.fileExists(atPath: "/proc/\(pid)/task/\(thread)"), "thread \(thread) is not the clone's")
        let probe: JSONValue = ["op": "probe", "job": 1, "path": .string(clip)]
        _ = try probe.serialized().withUnsafeBytes { try SocketIO.send(ours, $0) }
        let done = try #require(try receive())
        #expect(done["op"] == "done" && done["ok"] == true, "\(done.jsonString)")
        try ours.close()
        var status: Int32 = 0
        reaped = waitpid(pid, &status, 0) == pid
        #expect(reaped && status == 0, "the clone ended with status \(status)")
        #expect(kill(server.pid, 0) == 0, "the fork server ended with its clone")

        let junk: [UInt8] = Array("{\"op\":\"decode\"}".utf8)
        _ = try junk.withUnsafeBytes { try SocketIO.send(server.control, $0) }
        #expect(server.wait().code == 76)
    }

    @Test func faultSwitches() throws {
        let clip = try EngineTests.fixture.get()
        let faults = "crash-on=CRASH,abort-on=ABORT,hang-on=HANG,oom-on=OOM"
        func job(_ marker: String, _ extra: [String] = []) throws -> Worker {
            let w = try Worker(extra, faults: faults)
            _ = try #require(try w.receive())
            try w.send(["op": "decode", "job": 1, "path": .string(clip + "#\(marker)"), "options": [:]])
            return w
        }
        let crash = try job("CRASH")
        #expect(try crash.receive(timeout: 10) == nil)
        #expect(crash.wait().signal == SIGSEGV)
        let abortW = try job("ABORT")
        #expect(try abortW.receive(timeout: 10) == nil)
        #expect(abortW.wait().signal == SIGABRT)
        let hang = try job("HANG")
        #expect(try hang.receive(timeout: 1) == nil)
        #expect(hang.wait(timeout: 0.2).code == nil)  // still spinning
        kill(hang.pid, SIGKILL)
        #expect(hang.wait().signal == SIGKILL)
        let oom = try job("OOM", ["--address-space-mb", "1024"])
        let (reply, _) = try #require(try oom.receive(timeout: 30))
        #expect(reply["error"]?["reason"] == "out_of_memory")
        #expect(reply["exiting"] == true)
        #expect(oom.wait().code == 0)
        let start = try Worker([], faults: "exit-at-start")
        #expect(try start.receive(timeout: 10) == nil)
        #expect(start.wait().code == 71)
    }

    /// Landlock, checked inside the worker binary: `sandbox-check` runs the very `Sandbox.apply`
    /// that `serve` runs, then tries to create a file (must fail with EACCES) and to write a memfd
    /// (must work: blocks are written after the sandbox is in force). A hidden subcommand rather
    /// than a fault switch, so no request can ever reach a write path.
    @Test func landlockForbidsWrites() throws {
        let dir = try Support.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try Support.run([Support.worker, "sandbox-check", "--write", dir + "/forbidden"])
        #expect(r.status == 0)
        let json = try JSONValue.parse(Array(r.stdout.utf8))
        try #require((json["landlock"]?.intValue ?? 0) > 0, "kernel without Landlock")
        #expect(json["file_created"] == false)
        #expect(json["file_errno"]?.intValue == Int(EACCES))
        #expect(json["memfd_write"] == true)
        #expect(!FileManager.default.fileExists(atPath: dir + "/forbidden"))
    }
}
