import Foundation
import Shared
import SystemPackage
import Testing

@testable import Supervisor

/// Workers cloned by the fork server (`worker_start = "fork-server"`, the default), against a
/// real supervisor: they must be indistinguishable from exec'd workers to the supervisor (its
/// children, their own process groups, the same sandbox and faults), and a fork server that dies
/// must cost speed only, loudly.
@Suite(.serialized, .timeLimit(.minutes(5)))
final class ForkServerTests {
    let fixtures = TemporaryDirectory("forkserver")
    var goodClip: String { fixtures.file("good.mp4") }
    static let faults = [WorkerMessage.faultEnvironmentKey: "crash-on=CRASHME,abort-on=ABORTME"]

    init() throws {
        try Fixtures.clip(at: goodClip, seconds: 1)
    }

    private func copy(_ name: String) throws -> String { try fixtures.copy(of: goodClip, as: name) }

    /// ppid and process group of `pid`, from /proc.
    private func parentAndGroup(of pid: pid_t) -> (ppid: pid_t, pgid: pid_t)? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return nil }
        let fields = stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
        guard fields.count > 3, let ppid = pid_t(fields[1]), let pgid = pid_t(fields[2]) else { return nil }
        return (ppid, pgid)
    }

    private func startInfo(_ supervisor: SupervisorProcess) throws -> JSONValue {
        try #require(try supervisor.status()["workers"]?["start"])
    }

    @Test func clonedWorkersAreTheSupervisorsChildrenAndDecodeAndCrashLikeExecdOnes() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "2"], environment: Self.faults)
        let start = try startInfo(supervisor)
        #expect(start["mode"]?.stringValue == "fork-server")
        let forkServer = try #require(start["fork_server_pid"]?.intValue.map { pid_t($0) })
        #expect(start["problem"] == .null)
        #expect(StatusReport.render(try supervisor.status()).contains("cloned by the fork server, pid \(forkServer)"))
        #expect(supervisor.waitForStatus { status in
            let list = status["workers"]?["list"]?.arrayValue ?? []
            return (status["workers"]?["start"]?["forks"]?.intValue ?? 0) >= 4 && list.count >= 4
                && list.allSatisfy { $0["state"]?.stringValue == "idle" }
        }, "2 workers + 2 spares cloned and ready")

        let workers = supervisor.workerProcesses().map(\.pid)
        #expect(workers.count >= 4)
        #expect(!workers.contains(forkServer))
        for pid in workers {
            let info = try #require(parentAndGroup(of: pid))
            #expect(info.ppid == supervisor.pid, "worker \(pid) is not the supervisor's child")
            #expect(info.pgid == pid, "worker \(pid) does not lead its own process group")
        }

        let client = try supervisor.client()
        let (first, firstBlock) = try client.decode(goodClip, ["fps": 2])
        #expect(first["ok"]?.boolValue == true, "\(first)")
        // A crash and an abort in clones: the abort must be the clone's own SIGABRT (glibc asks
        // the kernel for the thread id), not a signal to the fork server.
        let (crash, _) = try client.decode(try copy("CRASHME.mp4"))
        #expect(crash.errorReason == "crashed")
        #expect(crash["error"]?["message"]?.stringValue?.contains("SIGSEGV") == true, "\(crash)")
        let (abort, _) = try client.decode(try copy("ABORTME.mp4"))
        #expect(abort.errorReason == "crashed")
        #expect(abort["error"]?["message"]?.stringValue?.contains("SIGABRT") == true, "\(abort)")
        #expect(kill(forkServer, 0) == 0, "the fork server died with its clones")

        // Replacements come from the same fork server, and decode the same bytes.
        #expect(supervisor.waitForStatus { ($0["workers"]?["start"]?["forks"]?.intValue ?? 0) >= 6 })
        let (again, againBlock) = try client.decode(goodClip, ["fps": 2])
        #expect(again["ok"]?.boolValue == true)
        let tensors = { (block: [UInt8]?) throws in try #require(block).withUnsafeBytes { try BlockReader.read($0).1 } }
        #expect(try tensors(againBlock) == tensors(firstBlock), "a replacement clone decodes other tensors")
        #expect(try startInfo(supervisor)["fork_server_pid"]?.intValue == Int(forkServer))

        // SIGTERM takes the fork server with the workers.
        #expect(supervisor.stop() == 0)
        #expect(kill(forkServer, 0) != 0, "the fork server outlived the supervisor")
        for pid in workers { #expect(kill(pid, 0) != 0, "worker \(pid) outlived the supervisor") }
    }

    /// A clone starts as a copy of the fork server's only thread, thread ids cached in it
    /// included. Two of a clone's threads waiting on one Swift runtime lock (as a clip's reader
    /// threads do on type metadata) spun at 100 % CPU until the deadline while the clone served
    /// from that thread; it serves from a thread of its own now. `contend-on` makes the wait
    /// certain (a lazy global initialised by one thread while another reads it) in fresh clones,
    /// and exec'd workers show what the same clips cost where no id was ever copied.
    @Test(arguments: ["fork-server", "exec"])
    func threadsOfAFreshCloneWaitingOnOneRuntimeLockGoOn(_ mode: String) throws {
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "2", "--worker-start", mode, "--clips-per-worker", "1", "--deadline", "10"],
            environment: [WorkerMessage.faultEnvironmentKey: "contend-on=CONTENDME"])
        #expect(try startInfo(supervisor)["mode"]?.stringValue == mode)
        let client = try supervisor.client()
        for i in 0..<3 {  // each clip in a fresh worker, whose lazy global is not yet initialised
            let (answer, _) = try client.decode(try copy("CONTENDME-\(i).mp4"), ["fps": 2])
            #expect(answer["ok"]?.boolValue == true, "\(mode), clip \(i): \(answer)")
        }
        #expect(supervisor.stop() == 0)
    }

    @Test func aDeadForkServerIsSaidAndWorkersAreExecdUntilItIsBack() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1"], environment: Self.faults)
        let forkServer = try #require(try startInfo(supervisor)["fork_server_pid"]?.intValue.map { pid_t($0) })
        let spawnsBefore = try #require(try supervisor.status()["counters"]?["spawns"]?.intValue)
        #expect(kill(forkServer, SIGKILL) == 0)
        #expect(supervisor.waitForStatus { $0["workers"]?["start"]?["fork_server_pid"] == .null },
                "the supervisor did not notice its fork server die")
        let start = try startInfo(supervisor)
        #expect(start["problem"]?.stringValue?.contains("killed by SIGKILL") == true, "\(start)")
        #expect(supervisor.zombieChildren().isEmpty, "the dead fork server was not reaped")
        #expect(StatusReport.render(try supervisor.status()).contains("started with exec for now: the fork server"))

        // A crash needs a replacement: it is exec'd, and decoding goes on.
        let client = try supervisor.client()
        let (crash, _) = try client.decode(try copy("CRASHME.mp4"))
        #expect(crash.errorReason == "crashed")
        #expect(supervisor.waitForStatus { ($0["counters"]?["spawns"]?.intValue ?? 0) > spawnsBefore })
        let (decoded, _) = try client.decode(goodClip, ["fps": 2])
        #expect(decoded["ok"]?.boolValue == true, "\(decoded)")
        #expect(try startInfo(supervisor)["forks"]?.intValue == 0)
        #expect(supervisor.stderr.contains("starting workers with exec"), "the fallback was not said")
    }

    /// A fork server that stops answering, or answers out of turn, holds the event loop for at
    /// most its fork timeout, once: it is stopped, said, and the workers are exec'd.
    @Test(arguments: ["fork-server-stall-at=5", "fork-server-lie-at=5"])
    func aForkServerThatStallsOrLiesIsReplacedByExec(fault: String) throws {
        let supervisor = try SupervisorProcess(
            arguments: ["--workers", "1"], environment: [WorkerMessage.faultEnvironmentKey: "crash-on=CRASHME,\(fault)"])
        // 1 worker + 2 spares took forks 1-3; each crash needs a replacement: the 4th is fine,
        // the 5th meets the fault.
        let client = try supervisor.client()
        for index in 0..<3 {
            // A new file each time: a crashed file is quarantined and never reaches a worker again.
            let (crash, _) = try client.decode(try copy("CRASHME-\(fault)-\(index).mp4"))
            #expect(crash.errorReason == "crashed")
        }
        #expect(supervisor.waitForStatus { $0["workers"]?["start"]?["problem"]?.stringValue != nil },
                "the supervisor still uses a fork server that \(fault)")
        let start = try startInfo(supervisor)
        let problem = start["problem"]?.stringValue ?? ""
        #expect(
            fault.hasPrefix("fork-server-stall") ? problem.contains("no answer to fork request 5 within 250 ms") : problem.contains("to fork request 5"),
            "\(problem)")
        #expect(start["fork_server_pid"] == .null)
        let started = Date()
        let (decoded, _) = try client.decode(goodClip, ["fps": 2])
        #expect(decoded["ok"]?.boolValue == true, "\(decoded)")
        #expect(Date().timeIntervalSince(started) < 5)
        #expect(supervisor.zombieChildren().isEmpty)
    }

    @Test func execModeStartsNoForkServer() throws {
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--worker-start", "exec"])
        let start = try startInfo(supervisor)
        #expect(start["mode"]?.stringValue == "exec")
        #expect(start["fork_server_pid"] == .null)
        #expect(start["problem"] == .null)
        #expect(supervisor.workerProcesses().count == supervisor.children().count)
        let (decoded, _) = try supervisor.client().decode(goodClip, ["fps": 2])
        #expect(decoded["ok"]?.boolValue == true)
    }
}
