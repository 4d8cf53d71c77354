#if canImport(Glibc)
import Glibc
#endif

/// Whether a busy worker is using the CPU: a decode slot is CPU, and a worker blocked in I/O
/// (a FIFO with no writer, a stalled NFS, Lustre or FUSE read) uses none, so its slot is lent to
/// the next clip while it waits for its deadline. Sampled from the event loop's timer — the
/// same idea as Go's sysmon handing the processor of a thread blocked in a syscall to another.
struct CPUWatch {
    /// How often a busy worker's CPU time is read.
    static let sampleIntervalMs = 200
    /// Below this share of one CPU over a window, the worker counts as stalled.
    static let stallShare = 0.05

    /// CPU seconds (user + system, all threads) and when they were read.
    private(set) var lastSeconds: Double
    private(set) var lastAt: Instant
    /// CPU seconds when the clip started.
    let startSeconds: Double
    let startedAt: Instant
    /// Whether the last full window showed (almost) no CPU use.
    private(set) var stalled = false
    /// The share of one CPU the last window showed.
    private(set) var lastShare = 1.0

    /// Starts watching `pid` as it takes a clip; nil when its /proc entry cannot be read.
    init?(pid: pid_t, now: Instant) {
        guard let seconds = ProcStat.read(pid: pid)?.cpuSeconds else { return nil }
        lastSeconds = seconds
        startSeconds = seconds
        lastAt = now
        startedAt = now
    }

    /// When the next sample is due.
    var nextSampleAt: Instant { lastAt.adding(milliseconds: Self.sampleIntervalMs) }

    /// Reads the CPU time again once a window has passed; returns whether `stalled` changed.
    mutating func sample(pid: pid_t, now: Instant) -> Bool {
        let elapsedMs = now.milliseconds(since: lastAt)
        guard elapsedMs >= Self.sampleIntervalMs, let reading = ProcStat.read(pid: pid) else { return false }
        lastShare = max(0, reading.cpuSeconds - lastSeconds) / (Double(elapsedMs) / 1000)
        lastSeconds = reading.cpuSeconds
        lastAt = now
        let wasStalled = stalled
        // A runnable worker that got little CPU is starved by load, not blocked: lending its slot
        // would only add load. Blocked means asleep (S: a FIFO, a pipe; D: a stalled mount).
        stalled = lastShare < Self.stallShare && reading.state != UInt8(ascii: "R")
        return stalled != wasStalled
    }

    /// CPU seconds used on the current clip so far (as of the last sample).
    var secondsOnClip: Double { max(0, lastSeconds - startSeconds) }
}
