import CClipvisorShims
import Shared

#if canImport(Glibc)
import Glibc
#endif

/// Everything `clipvisor serve` can be told. Defaults make a useful sidecar with no
/// configuration; the config file (systemd issue) and flags override them in that order.
struct ServeConfiguration: Sendable {
    var socketPath: String = SocketDiscovery.serverDefault
    var socketMode: mode_t = 0o660
    /// Absolute path of `clipvisor-worker`; next to this executable unless `--worker` says.
    var workerExecutable: String = ServeConfiguration.siblingWorker()
    /// Pool size; CPUs available to the process (affinity mask and cgroup quota) by default.
    var workers: Int = CPUBudget.available()
    /// Idle workers kept started beyond `workers`: after a kill (deadline, cancel) or a recycle
    /// the next clip goes to one of them at once instead of waiting 30–700 ms for a spawn. At
    /// most `workers` decode at the same time.
    var spareWorkers = 2
    /// Hard cap on worker processes. A worker blocked in I/O lends its slot to the next clip
    /// and a spare is started in its place, so hangs on a stalled mount never hold the pool; this
    /// bounds how far that goes. Default: four per decode slot and at least 16 (a handful of
    /// clips on one stalled mount must not stop a small node), never below `workers + spareWorkers`.
    var maxWorkers: Int? = nil

    var effectiveMaxWorkers: Int { maxWorkers ?? max(16, 4 * workers, workers + spareWorkers) }

    /// A worker exits and is replaced after this many clips (bounds leaks in codecs).
    var clipsPerWorker = 100
    var deadlineDefaultMs = 30_000
    var deadlineMaxMs = 600_000
    /// Clips waiting for a worker; past it new clips are answered `overloaded`.
    var queueLimit = 4096
    /// How long a clip may wait for a worker before it is answered `overloaded`.
    var queueWaitMs = 60_000
    /// A worker that has not said `ready` by then is killed and counted as a failed start.
    var workerStartTimeoutMs = 10_000
    /// RLIMIT_AS of a worker, MiB: an allocation beyond it fails and answers `out_of_memory`.
    var workerAddressSpaceMB = 16_384
    /// RLIMIT_CPU of a worker over its lifetime, seconds.
    var workerCPUSeconds = 3_600
    /// RLIMIT_NOFILE of a worker.
    var workerOpenFiles = 256
    /// The Landlock write ban in workers (`sandbox`): where it is refused, `.auto` decodes with
    /// the remaining limits (no_new_privs and rlimits always apply) and `.required` decodes nothing.
    var landlock: WorkerMessage.LandlockMode = .auto
    /// Workers cloned from a fork server (fast) or exec'd each (its own address-space layout).
    var workerStart: WorkerStartMode = .forkServer
    /// What happens to a worker after media it refused (`after_refused_media`).
    var afterRefusedMedia: AfterRefusedMedia = .replace
    var maxSourcePixels = 8192 * 8192
    var maxOutputBytes = 2 << 30
    /// Bytes of finished blocks the supervisor may hold for clients that have not read them yet;
    /// past it, no new clip is dispatched until clients catch up.
    var memoryBudgetBytes: Int? = nil
    /// Block slabs a client connection may have (`block_slabs`; 0: every block a fresh memfd).
    var blockSlabs = 4
    /// Bytes all block slabs may take together (`block_slab_memory`).
    var blockSlabMemory = 1 << 30
    /// On SIGTERM, how long clips in flight may run on before they are killed.
    var gracePeriodMs = 10_000
    /// Requests in one `sample`.
    var maxSampleClips = 256
    /// Data roots (`roots` in the config file, `--root`): absolute paths; empty means no path policy.
    var roots: [String] = []

    var effectiveMemoryBudget: Int { memoryBudgetBytes ?? max(1, workers) * maxOutputBytes }

    /// Arguments for `clipvisor-worker serve` (docs/worker-protocol.md).
    var workerArguments: [String] {
        var list = [
            "serve", "--max-clips", String(clipsPerWorker),
            "--address-space-mb", String(workerAddressSpaceMB),
            "--cpu-seconds", String(workerCPUSeconds),
            "--open-files", String(workerOpenFiles),
        ]
        if landlock != .auto { list += ["--landlock", landlock.rawValue] }
        return list
    }

    /// `clipvisor-worker` in the directory of this executable (`/proc/self/exe`).
    static func siblingWorker() -> String {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { return "clipvisor-worker" }
        let path = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let directory = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        return "\(directory)/clipvisor-worker"
    }
}

/// CPUs this process may use: the affinity mask, capped by a cgroup CPU quota (v2 `cpu.max`
/// or v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`), at least 1.
enum CPUBudget {
    static func available() -> Int {
        let affinity = Int(cv_affinity_cpu_count())
        var count = affinity > 0 ? affinity : 1
        if let quota = cgroupQuota() { count = min(count, max(1, Int(quota.rounded(.up)))) }
        return max(1, count)
    }

    static func cgroupQuota() -> Double? {
        if let line = readSmallFile("/sys/fs/cgroup/cpu.max") {
            let parts = line.split(separator: " ")
            if parts.count == 2, parts[0] != "max", let quota = Double(parts[0]), let period = Double(parts[1]), period > 0 {
                return quota / period
            }
            return nil
        }
        if let quotaText = readSmallFile("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
            let periodText = readSmallFile("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
            let quota = Double(quotaText), let period = Double(periodText), quota > 0, period > 0
        {
            return quota / period
        }
        return nil
    }

    static func readSmallFile(_ path: String) -> String? {
        guard let bytes = Filesystem.read(path, chunk: 256), !bytes.isEmpty else { return nil }
        return String(decoding: bytes, as: UTF8.self).trimming()
    }
}

