#if canImport(Glibc)
import Glibc
#endif

/// What /proc says about one process (proc(5), `/proc/PID/stat`): CPU time, memory, threads,
/// start time. Read by the metrics scrape and by `status` (per-worker CPU for `clipvisor top`).
struct ProcStat {
    /// The scheduler state: `R` running or runnable, `S` asleep, `D` in uninterruptible I/O...
    var state: UInt8
    var cpuSeconds: Double
    var residentBytes: Int
    var virtualBytes: Int
    var threads: Int
    var startTimeSeconds: Double

    static let ticksPerSecond = Double(sysconf(Int32(_SC_CLK_TCK)))
    static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// `/proc/self/stat` for nil, one thread's `stat` with `thread`. Nil when the process is gone or
    /// /proc is not readable.
    static func read(pid: Int32?, thread: Int32? = nil) -> ProcStat? {
        let path: String
        switch (pid, thread) {
        case (nil, _): path = "/proc/self/stat"
        case (let pid?, nil): path = "/proc/\(pid)/stat"
        case (let pid?, let thread?): path = "/proc/\(pid)/task/\(thread)/stat"
        }
        guard let bytes = Filesystem.read(path, chunk: 1024),
            let close = bytes.lastIndex(of: UInt8(ascii: ")"))
        else { return nil }
        // The command name (field 2) may hold spaces and parentheses: fields count from its end.
        let fields = bytes[(close + 1)...].split(separator: UInt8(ascii: " ")).map { String(decoding: $0, as: UTF8.self) }
        // fields[0] is field 3 (state): field N is fields[N - 3].
        func field(_ n: Int) -> Double { n - 3 < fields.count ? Double(fields[n - 3]) ?? 0 : 0 }
        return ProcStat(
            state: fields.first?.utf8.first ?? UInt8(ascii: "?"),
            cpuSeconds: (field(14) + field(15)) / ticksPerSecond,
            residentBytes: Int(field(24)) * pageSize,
            virtualBytes: Int(field(23)),
            threads: Int(field(20)),
            startTimeSeconds: bootTime + field(22) / ticksPerSecond)
    }

    /// A thread's time on the CPU in nanoseconds, as seconds (`schedstat`'s first field; the
    /// main thread's without `thread`): finer than the 10 ms ticks of `stat`, for short windows.
    static func threadCPUSeconds(pid: Int32, thread: Int32? = nil) -> Double? {
        let path = thread.map { "/proc/\(pid)/task/\($0)/schedstat" } ?? "/proc/\(pid)/schedstat"
        guard let bytes = Filesystem.read(path, chunk: 256),
            let first = bytes.split(separator: UInt8(ascii: " ")).first,
            let nanoseconds = UInt64(String(decoding: first, as: UTF8.self))
        else { return nil }
        return Double(nanoseconds) / 1e9
    }

    /// Seconds since the epoch at boot: the wall clock less CLOCK_BOOTTIME (which counts
    /// suspend too, as the start time in /proc does). Not `btime` from /proc/stat: the service's
    /// ProcSubset=pid hides that file.
    static var bootTime: Double {
        var wall = timespec()
        var boot = timespec()
        clock_gettime(CLOCK_REALTIME, &wall)
        clock_gettime(CLOCK_BOOTTIME, &boot)
        return Double(wall.tv_sec - boot.tv_sec) + Double(wall.tv_nsec - boot.tv_nsec) / 1e9
    }

    /// CPU time of reaped children (getrusage RUSAGE_CHILDREN): every worker that has exited.
    static func reapedChildrenCPUSeconds() -> Double {
        var usage = rusage()
        guard getrusage(RUSAGE_CHILDREN.rawValue, &usage) == 0 else { return 0 }
        func seconds(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
        return seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }

    /// Open fds of this process (entries of /proc/self/fd, less the one reading it).
    static func openFileCount() -> Int {
        guard let directory = opendir("/proc/self/fd") else { return 0 }
        defer { closedir(directory) }
        var count = 0
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { $0.first }
            if name != UInt8(ascii: ".") { count += 1 }
        }
        return max(0, count - 1)
    }

    static func maxFileCount() -> Int {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 0 }
        return limit.rlim_cur == rlim_t.max ? -1 : Int(clamping: limit.rlim_cur)
    }
}
