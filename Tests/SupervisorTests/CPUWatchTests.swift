import Foundation
import Testing

@testable import Supervisor

/// CPUWatch reads a worker's serving thread, which in a clone of the fork server is not the
/// process's first thread (that one only waits for it: ForkServer.swift). A helper process
/// shaped like such a clone: its first thread sleeps, a second one is on the CPU ~30 % of the
/// time in 3 ms bursts, asleep in between.
@Suite struct CPUWatchTests {
    private static let helper = """
        import threading, time, sys
        def serve():
            while True:
                end = time.perf_counter() + 0.003
                while time.perf_counter() < end:
                    pass
                time.sleep(0.007)
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        print(t.native_id, flush=True)
        time.sleep(30)
        """

    @Test func theServingThreadTellsABusyWorkerFromAStalledOneWhereTheFirstThreadSleeps() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", Self.helper]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        defer {
            // SIGKILL: a signal the test runner's thread blocks stays blocked in its children.
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        let line = String(decoding: output.fileHandleForReading.availableData, as: UTF8.self)
        let thread = try #require(pid_t(line.trimmingCharacters(in: .whitespacesAndNewlines)), "helper said \(line)")
        let pid = process.processIdentifier
        #expect(thread != pid)

        // Watched through its serving thread: never stalled, whatever the 10 ms ticks of a
        // 20 ms window say, since that thread's own clock moved.
        var serving = try #require(CPUWatch(pid: pid, thread: thread, now: Instant.now()))
        var shares: [Double] = []
        for window in 0..<4 {
            usleep(window == 0 ? 25_000 : 105_000)
            _ = serving.sample(pid: pid, now: Instant.now())
            #expect(!serving.stalled, "window \(window): share \(serving.lastShare)")
            shares.append(serving.lastShare)
        }
        #expect(shares.allSatisfy { $0 > 0.05 }, "\(shares)")

        // Its first thread alone is asleep and uses no CPU: watched through it (as for an exec'd
        // worker), only the process's ticks could tell, and the first 20 ms window has none of
        // its own clock to go on.
        let first = try #require(ProcStat.read(pid: pid, thread: pid))
        #expect(first.state == UInt8(ascii: "S"))
        let firstClock = try #require(ProcStat.threadCPUSeconds(pid: pid))
        usleep(50_000)
        #expect(try #require(ProcStat.threadCPUSeconds(pid: pid)) - firstClock < 0.002)
    }
}
