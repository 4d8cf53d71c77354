#if canImport(Glibc)
import Glibc
#endif

/// Whether a busy worker is using the CPU: a decode slot is CPU, and a worker blocked in I/O
/// (a FIFO with no writer, a stalled NFS, Lustre or FUSE read) uses none, so its slot is lent to
/// the next clip while it waits for its deadline. Sampled from the event loop's timer — the
/// same idea as Go's sysmon handing the processor of a thread blocked in a syscall to another.
///
/// Two clocks: /proc/PID/stat's utime + stime (every thread, but in 10 ms ticks) and the serving
/// thread's schedstat (nanoseconds). A worker is stalled when neither moved over a window and its
/// serving thread is asleep. That thread is the process's first one for an exec'd worker, and a
/// thread of its own for a clone of the fork server (`ready`'s `thread`; ForkServer.swift says
/// why), whose first thread only waits for it. The first check comes 20 ms after it takes the
/// clip (a FIFO blocks at once; the nanosecond clock tells at that scale), then every 100 ms,
/// so a hang holds a decode slot for about 20 ms, not for its whole deadline. (At 50 ms, eight
/// hangs with a 2 s deadline held 10 % of a 2-worker pool's time; at 20 ms, 7 %: bench/chaos.py.)
/// A worker that merely waits a moment for the disk may be lent out too: it counts again when it
/// resumes, a brief over-subscription bounded by `max_workers`.
struct CPUWatch {
    /// The first check after the worker takes the clip, then the interval between checks.
    static let firstSampleMs = 20
    static let sampleIntervalMs = 100
    /// Below this share of one CPU over a window, the worker counts as stalled.
    static let stallShare = 0.05

    private struct Reading {
        var state: UInt8
        /// All threads, user + system (10 ms resolution).
        var processSeconds: Double
        /// The serving thread's time on the CPU, when its schedstat is there.
        var threadSeconds: Double?

        init?(pid: pid_t, thread: pid_t?) {
            guard let stat = ProcStat.read(pid: pid) else { return nil }
            processSeconds = stat.cpuSeconds
            if let thread {
                guard let serving = ProcStat.read(pid: pid, thread: thread) else { return nil }
                state = serving.state
            } else {
                state = stat.state
            }
            threadSeconds = ProcStat.threadCPUSeconds(pid: pid, thread: thread)
        }
    }

    /// The serving thread, when it is not the first one.
    private let thread: pid_t?
    private var last: Reading
    private(set) var lastAt: Instant
    /// CPU seconds (all threads) when the clip started.
    let startSeconds: Double
    let startedAt: Instant
    private var sampled = false
    /// Whether the last window showed (almost) no CPU use while the worker was asleep.
    private(set) var stalled = false
    /// The share of one CPU the last window showed.
    private(set) var lastShare = 1.0

    /// Starts watching `pid` (whose jobs `thread` serves, when it is not the first thread) as it
    /// takes a clip; nil when its /proc entries cannot be read.
    init?(pid: pid_t, thread: pid_t?, now: Instant) {
        guard let reading = Reading(pid: pid, thread: thread) else { return nil }
        self.thread = thread
        last = reading
        startSeconds = reading.processSeconds
        lastAt = now
        startedAt = now
    }

    /// When the next sample is due.
    var nextSampleAt: Instant { lastAt.adding(milliseconds: sampled ? Self.sampleIntervalMs : Self.firstSampleMs) }

    /// Reads the CPU time again once a window has passed; returns whether `stalled` changed.
    mutating func sample(pid: pid_t, now: Instant) -> Bool {
        let elapsedMs = now.milliseconds(since: lastAt)
        guard now >= nextSampleAt, elapsedMs > 0, let reading = Reading(pid: pid, thread: thread) else { return false }
        let seconds = Double(elapsedMs) / 1000
        var used = max(0, reading.processSeconds - last.processSeconds)
        if let thread = reading.threadSeconds, let before = last.threadSeconds { used = max(used, thread - before) }
        lastShare = used / seconds
        last = reading
        lastAt = now
        sampled = true
        let wasStalled = stalled
        // A runnable worker that got little CPU is starved by load, not blocked: lending its slot
        // would only add load. Blocked means asleep (S: a FIFO, a pipe; D: a stalled mount).
        stalled = lastShare < Self.stallShare && reading.state != UInt8(ascii: "R")
        return stalled != wasStalled
    }

    /// CPU seconds used on the current clip so far (as of the last sample).
    var secondsOnClip: Double { max(0, last.processSeconds - startSeconds) }
}
