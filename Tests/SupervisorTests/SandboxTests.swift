import Foundation
import Shared
import Testing

@testable import Supervisor

/// Workers where a seccomp filter refuses Landlock, as container runtimes' filters do
/// (systemd-nspawn, older Docker and containerd profiles): a real filter, installed by a small
/// launcher that then execs the real worker, so the worker meets EPERM from the kernel itself.
@Suite(.serialized, .timeLimit(.minutes(3)))
final class SandboxTests {
    let directory = TemporaryDirectory("sandbox")
    var clip: String { directory.file("good.mp4") }
    /// `clipvisor-worker` behind a seccomp filter that answers landlock_create_ruleset with EPERM.
    var filteredWorker: String { directory.file("filtered-worker") }

    init() throws {
        try Fixtures.clip(at: clip, seconds: 1)
        let launcher = directory.file("seccomp_exec.py")
        try Self.seccompLauncher.write(toFile: launcher, atomically: true, encoding: .utf8)
        try "#!/bin/sh\nexec python3 \(launcher) \(Binaries.worker) \"$@\"\n"
            .write(toFile: filteredWorker, atomically: true, encoding: .utf8)
        chmod(filteredWorker, 0o755)
    }

    /// Installs a seccomp filter (x86_64 and aarch64 syscall numbers of landlock_create_ruleset
    /// are both 444) that fails that call with EPERM, then execs argv[1:].
    static let seccompLauncher = """
        import ctypes, os, struct, sys
        def op(code, jt, jf, k): return struct.pack("HBBI", code, jt, jf, k)
        LOAD_NR, JEQ, RET = 0x20, 0x15, 0x06
        program = (op(LOAD_NR, 0, 0, 0) + op(JEQ, 0, 1, 444)
                   + op(RET, 0, 0, 0x00050000 | 1) + op(RET, 0, 0, 0x7fff0000))
        code = ctypes.create_string_buffer(program)
        class Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        fprog = Fprog(len(program) // 8, ctypes.cast(code, ctypes.c_void_p))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
            sys.exit("seccomp: errno %d" % ctypes.get_errno())
        os.execv(sys.argv[1], sys.argv[1:])
        """

    private func sandboxCheck(_ worker: String, _ arguments: [String]) throws -> (Int32, JSONValue) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: worker)
        process.arguments = ["sandbox-check", "--write", directory.file("written-\(UInt32.random(in: 0...UInt32.max))")] + arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        try process.run()
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, try JSONValue.parse(Array(output)))
    }

    @Test func theWorkerSaysWhyLandlockIsMissingAndRequiredModeRefuses() throws {
        let (autoStatus, auto) = try sandboxCheck(filteredWorker, [])
        #expect(autoStatus == 0)
        #expect(auto["landlock"]?.intValue == 0)
        #expect(auto["file_created"]?.boolValue == true, "no write ban without Landlock: the check must say so, not pretend")
        let problem = auto["landlock_problem"]?.stringValue ?? ""
        #expect(problem.contains("seccomp") && problem.contains("errno 1"), "\(problem)")

        let (requiredStatus, required) = try sandboxCheck(filteredWorker, ["--landlock", "required"])
        #expect(requiredStatus == WorkerMessage.ExitCode.sandbox.rawValue)
        #expect(required["error"]?.stringValue?.contains("Landlock is required") == true, "\(required.jsonString)")

        // Unfiltered, on this kernel, the ban is in force and nothing is reported missing.
        let (_, plain) = try sandboxCheck(Binaries.worker, [])
        if plain["landlock"]?.intValue ?? 0 > 0 {
            #expect(plain["landlock_problem"] == .null)
            #expect(plain["file_created"]?.boolValue == false)
        }
    }

    @Test func workersRefusedLandlockStillDecodeAndTheOperatorIsToldOnce() throws {
        let supervisor = try SupervisorProcess(arguments: [
            "--worker", filteredWorker, "--workers", "1", "--spare-workers", "1", "--clips-per-worker", "1",
        ])
        let client = try supervisor.client()
        for _ in 0..<3 {
            let (answer, block) = try client.decode(clip, ["frames": 2, "width": 64, "height": 48])
            #expect(answer["ok"]?.boolValue == true, "\(answer.jsonString)")
            #expect(block != nil)
        }
        let status = try supervisor.status()
        #expect(status["counters"]?["spawns"]?.intValue ?? 0 >= 4, "every clip recycles its worker")
        let sandbox = status["sandbox"]
        #expect(sandbox?["landlock_mode"]?.stringValue == "auto")
        #expect(sandbox?["missing"] == ["landlock"], "\(status.jsonString)")
        #expect(sandbox?["problem"]?.stringValue?.contains("seccomp") == true)
        #expect(StatusReport.render(status).contains("WITHOUT the Landlock write ban"))
        let warnings = supervisor.stderr.components(separatedBy: "without the Landlock write ban").count - 1
        #expect(warnings == 1, "said once, not once per worker: \(supervisor.stderr)")
    }

    @Test func requiredModeDecodesNothingAndSaysWhy() throws {
        let directory = TemporaryDirectory("required")
        let process = SupervisorProcessLauncher.start(
            directory: directory, arguments: ["--worker", filteredWorker, "--workers", "1", "--sandbox", "required"],
            environment: [:])
        defer {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        let client = try SupervisorClient.connect(candidates: [directory.file("s.sock")], timeoutMs: 5000)
        let status = try client.status(within: 5) { $0["workers"]?["last_start_error"]?.stringValue != nil }
        let (answer, _) = try client.decode(clip, timeoutMs: 5000)
        #expect(answer.errorReason == "overloaded")
        #expect(answer["error"]?["detail"]?.stringValue == "no_workers")
        let lastError = status["workers"]?["last_start_error"]?.stringValue ?? ""
        #expect(lastError.contains("sandbox"), "\(status.jsonString)")
        #expect(status["sandbox"]?["landlock_mode"]?.stringValue == "required")
    }

    @Test func anUnfilteredPoolReportsTheBanInForce() throws {
        let (_, plain) = try sandboxCheck(Binaries.worker, [])
        let abi = plain["landlock"]?.intValue ?? 0
        let supervisor = try SupervisorProcess(arguments: ["--workers", "1", "--spare-workers", "0"])
        let sandbox = try supervisor.status()["sandbox"]
        #expect(sandbox?["landlock_abi"]?.intValue == abi)
        #expect(sandbox?["missing"] == (abi > 0 ? [] : ["landlock"]))
        #expect(!supervisor.stderr.contains("without the Landlock write ban") || abi == 0)
    }
}
