import Foundation
import Shared
import Testing

@testable import DecodeWorker

/// The two hang faults the chaos suite (bench/chaos.py) relies on must differ the way a supervisor
/// can see: `spin-on` burns CPU like a codec stuck in a loop, `sleep-on` blocks using none, like a
/// read from a stalled network mount.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct StallFaultTests {
    @Test func parsesSpinSleepAndTheOldHangName() {
        let faults = Faults.parse("spin-on=SPIN, sleep-on=SLEEP,hang-on=HANG,sleep-on=")
        #expect(faults.hangOn == ["SPIN", "HANG"])
        #expect(faults.sleepOn == ["SLEEP"])
    }

    /// CPU ticks (utime + stime) of a live process, from /proc/PID/stat.
    static func cpuTicks(_ pid: pid_t) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = text.lastIndex(of: ")")
        else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // After "(comm)": state is field 0, utime field 11, stime field 12.
        guard fields.count > 12, let user = Int(fields[11]), let system = Int(fields[12]) else { return nil }
        return user + system
    }

    @Test func sleepUsesNoCPUWhileSpinDoes() throws {
        let clip = try EngineTests.fixture.get()
        let faults = "spin-on=SPINME,sleep-on=SLEEPME"
        func stuck(_ marker: String) throws -> ServeTests.Worker {
            let w = try ServeTests.Worker([], faults: faults)
            _ = try #require(try w.receive())
            try w.send(["op": "decode", "job": 1, "path": .string(clip + "#\(marker)"), "options": [:]])
            return w
        }
        let sleeper = try stuck("SLEEPME")
        let spinner = try stuck("SPINME")
        defer {
            kill(sleeper.pid, SIGKILL)
            kill(spinner.pid, SIGKILL)
            _ = sleeper.wait()
            _ = spinner.wait()
        }
        #expect(try sleeper.receive(timeout: 0.5) == nil, "a sleeping worker never replies")
        let sleepBefore = try #require(Self.cpuTicks(sleeper.pid))
        let spinBefore = try #require(Self.cpuTicks(spinner.pid))
        Thread.sleep(forTimeInterval: 1.5)
        let sleepAfter = try #require(Self.cpuTicks(sleeper.pid))
        let spinAfter = try #require(Self.cpuTicks(spinner.pid))
        #expect(sleepAfter - sleepBefore <= 2, "sleep-on used \(sleepAfter - sleepBefore) ticks in 1.5 s")
        // Even on a loaded 2-core machine a spinning process gets well over 10 ticks (0.1 s) in 1.5 s.
        #expect(spinAfter - spinBefore >= 10, "spin-on used only \(spinAfter - spinBefore) ticks in 1.5 s")
        #expect(sleeper.wait(timeout: 0.1).code == nil, "still blocked")
    }
}
