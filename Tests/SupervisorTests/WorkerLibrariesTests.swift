import Foundation
import Shared
import Testing

@testable import Supervisor

/// A worker the dynamic loader cannot start (its FFmpeg library missing, or of another major
/// version) is a host problem: one line naming the library and the package, never `crashed`,
/// nothing quarantined.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct WorkerLibrariesTests {
    @Test func theLoaderOutputNamesTheLibrary() {
        let trace = """
            \tlinux-vdso.so.1 (0x00007ffd)
            \tlibavformat.so.59 => /lib/x86_64-linux-gnu/libavformat.so.59 (0x00007f)
            \tlibswscale.so.9 => not found
            """
        #expect(WorkerLibraries.firstProblem(in: trace)?.library == "libswscale.so.9")
        #expect(WorkerLibraries.firstProblem(in: trace)?.problem == "not found on this host")
        let error = "/usr/bin/clipvisor-worker: error while loading shared libraries: libavcodec.so.59: file too short"
        #expect(WorkerLibraries.firstProblem(in: error)?.library == "libavcodec.so.59")
        #expect(WorkerLibraries.firstProblem(in: error)?.problem == "file too short")
        #expect(WorkerLibraries.firstProblem(in: "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)") == nil)

        #expect(WorkerLibraries.debianPackage(soname: "libavcodec.so.59") == "libavcodec59")
        #expect(WorkerLibraries.debianPackage(soname: "libswresample.so.4") == "libswresample4")
        #expect(WorkerLibraries.debianPackage(soname: "libx265.so.199") == "libx265-199")
        #expect(WorkerLibraries.debianPackage(soname: "libgcc_s.so.1") == "libgcc-s1")
    }

    @Test func aWorkerWithoutItsFFmpegLibraryIsReportedInOneLineNotCrashed() throws {
        let directory = TemporaryDirectory("libraries")
        let clip = directory.file("good.mp4")
        try Fixtures.clip(at: clip, seconds: 1)
        // The real worker, asking the loader for a libswscale major this host does not have
        // (a wheel built against another FFmpeg): same length, so the ELF stays valid.
        let worker = directory.file("clipvisor-worker")
        var bytes = try Array(Data(contentsOf: URL(fileURLWithPath: Binaries.worker)))
        let needle = Array("libswscale.so.6\0".utf8)
        let replacement = Array("libswscale.so.9\0".utf8)
        var found = 0
        var index = 0
        while index + needle.count <= bytes.count {
            if bytes[index] == needle[0], Array(bytes[index..<index + needle.count]) == needle {
                bytes.replaceSubrange(index..<index + needle.count, with: replacement)
                found += 1
            }
            index += 1
        }
        try #require(found == 1, "the worker names libswscale.so.6 once in its dynamic section")
        try Data(bytes).write(to: URL(fileURLWithPath: worker))
        chmod(worker, 0o755)

        let process = SupervisorProcessLauncher.start(
            directory: directory, arguments: ["--worker", worker, "--workers", "1"], environment: [:])
        defer {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        let client = try SupervisorClient.connect(candidates: [directory.file("s.sock")], timeoutMs: 5000)
        var status = try client.status(within: 5) { ($0["workers"]?["consecutive_start_failures"]?.intValue ?? 0) >= 3 }
        let expected = "the decode worker cannot load libswscale.so.9 (not found on this host): install libswscale9"
        let lastError = status["workers"]?["last_start_error"]?.stringValue ?? ""
        #expect(lastError.hasPrefix(expected), "\(status.jsonString)")
        #expect(!lastError.contains("\n"))
        #expect(StatusReport.render(status).contains(expected))

        let started = Date()
        let (answer, block) = try client.decode(clip, timeoutMs: 10_000)
        #expect(Date().timeIntervalSince(started) < 5, "answered at once, not at the queue bound")
        #expect(block == nil)
        #expect(answer.errorReason == "overloaded", "\(answer.jsonString)")
        #expect(answer["error"]?["detail"]?.stringValue == "no_workers")
        #expect(answer["error"]?["message"]?.stringValue?.contains(expected) == true, "\(answer.jsonString)")

        status = try client.call(["op": "status"], timeoutMs: 5000).0["status"] ?? .null
        #expect(status["counters"]?["crashes"]?.intValue == 0)
        #expect(status["skip_log"]?["quarantined"]?.intValue == 0)
        let skips = (try? String(contentsOfFile: directory.file("skips.jsonl"), encoding: .utf8)) ?? ""
        #expect(skips.isEmpty, "a host problem is not a clip's: \(skips)")
    }
}
