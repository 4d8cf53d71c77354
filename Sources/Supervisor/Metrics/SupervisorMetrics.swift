import Prometheus
import Shared
import Synchronization

/// The supervisor's Prometheus metrics (docs/operations.md lists them all).
///
/// Two sides meet here and nothing else: the event loop records events and publishes its
/// gauges; the scrape threads (HTTP listener, textfile writer) emit text. swift-prometheus'
/// `Counter`, `Gauge` and `Histogram` are `Sendable` (atomics and locks), so the loop writes them
/// without waiting on a scraper for longer than one short lock; the values computed at scrape
/// time (`process_*`, worker CPU) live in a `Mutex` below. The class holds only `let`s of
/// `Sendable` types, so it is `Sendable` without `@unchecked`.
///
/// Conventions: `clipvisor_` prefix, base units (seconds, bytes), `_total` counters, and labels
/// only from small fixed sets (outcomes, request kinds, worker states): never a path.
final class SupervisorMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()

    /// Every outcome a clip can have: `ok`, `partial` (decoded up to damage) and each skip reason.
    static let clipOutcomes = ["ok", "partial"] + SkipReason.allCases.map(\.rawValue)
    /// Protocol operations; anything else is counted as `unknown`.
    static let requestKinds = ["hello", "decode", "sample", "probe", "cancel", "status", "skips", "forget", "metrics", "unknown"]
    /// Worker states as `status` names them, plus `spare`: idle workers beyond the `workers`
    /// that may decode at once.
    static let workerStates = ["starting", "idle", "spare", "busy", "retiring", "killed"]
    /// Why a worker was killed (from the supervisor's own reasons, folded into a fixed set).
    static let killReasons = ["deadline", "cancelled", "start_timeout", "protocol", "shutdown", "other"]

    static let secondsBuckets: [Double] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
    static let queueBuckets: [Double] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300]
    /// 64 KiB to 4 GiB in steps of 4.
    static let byteBuckets: [Double] = (0...8).map { Double(65_536 << (2 * $0)) }

    private let clips: [String: Counter]
    private let requests: [String: Counter]
    private let samples: [String: Counter]
    private let workers: [String: Gauge]
    private let kills: [String: Counter]
    /// Worker time per clip: from the moment a worker took it to its answer (killed ones too).
    let decodeSeconds: ValueHistogram
    /// Time a clip waited for a worker (dispatched, or answered from the queue).
    let queueWaitSeconds: ValueHistogram
    /// What the client sees: from the request's arrival to its answer.
    let answerSeconds: ValueHistogram
    let blockBytes: ValueHistogram
    let spawns: Counter
    let spawnFailures: Counter
    let recycles: Counter
    let bytesDelivered: Counter
    let skipLogWriteErrors: Counter
    let connectionsAccepted: Counter
    let queueDepth: Gauge
    let clientsConnected: Gauge
    let workersConfigured: Gauge
    let memoryHeldBytes: Gauge
    let memoryBudgetBytes: Gauge
    let blockSlabs: Gauge
    let blockSlabBytes: Gauge
    let quarantineEntries: Gauge
    private let scraped: ScrapeTimeMetrics

    init(version: String = ClipvisorVersion.string) {
        let r = registry
        func family(_ name: String, _ label: String, _ values: [String], _ help: String) -> [String: Counter] {
            Dictionary(uniqueKeysWithValues: values.map { ($0, r.counter(name, labels: [(label, $0)], help: help)) })
        }
        clips = family("clipvisor_clips_total", "outcome", Self.clipOutcomes, "Clips answered, by outcome (ok, partial, or the skip reason).")
        requests = family("clipvisor_requests_total", "kind", Self.requestKinds, "Protocol requests received, by operation.")
        samples = family("clipvisor_samples_total", "outcome", ["ok"] + SkipReason.allCases.map(\.rawValue), "Samples (lists of clips) finished: ok, or the reason of the first failed clip.")
        kills = family("clipvisor_worker_kills_total", "reason", Self.killReasons, "Workers killed (SIGKILL to the process group) and reaped, by reason.")
        workers = Dictionary(uniqueKeysWithValues: Self.workerStates.map {
            ($0, r.gauge("clipvisor_workers", labels: [("state", $0)], help: "Worker processes by state; spare: idle beyond the workers that may decode at once."))
        })
        decodeSeconds = r.histogram("clipvisor_decode_seconds", labels: [], buckets: Self.secondsBuckets, help: "Worker time per clip, from hand-over to answer (timeouts included).")
        queueWaitSeconds = r.histogram("clipvisor_queue_wait_seconds", labels: [], buckets: Self.queueBuckets, help: "Time clips waited for a free worker.")
        answerSeconds = r.histogram("clipvisor_answer_seconds", labels: [], buckets: Self.secondsBuckets, help: "Client-visible time per clip, from request to answer.")
        blockBytes = r.histogram("clipvisor_block_bytes", labels: [], buckets: Self.byteBuckets, help: "Size of the result blocks handed to clients.")
        spawns = r.counter("clipvisor_worker_spawns_total", help: "Worker processes started.")
        spawnFailures = r.counter("clipvisor_worker_spawn_failures_total", help: "Worker starts that failed (exec error, died or timed out before ready).")
        recycles = r.counter("clipvisor_worker_recycles_total", help: "Workers retired after their clip quota.")
        bytesDelivered = r.counter("clipvisor_delivered_bytes_total", help: "Bytes of result blocks handed to clients.")
        skipLogWriteErrors = r.counter("clipvisor_skip_log_write_errors_total", help: "Skip records that could not be written durably.")
        connectionsAccepted = r.counter("clipvisor_connections_total", help: "Client connections accepted.")
        queueDepth = r.gauge("clipvisor_queue_depth", help: "Clips waiting for a worker.")
        clientsConnected = r.gauge("clipvisor_clients_connected", help: "Client connections open.")
        workersConfigured = r.gauge("clipvisor_workers_configured", help: "Workers that may decode at once (--workers).")
        memoryHeldBytes = r.gauge("clipvisor_memory_budget_used_bytes", help: "Bytes of finished blocks not yet read by clients.")
        memoryBudgetBytes = r.gauge("clipvisor_memory_budget_bytes", help: "Bytes of unread blocks at which dispatch pauses.")
        blockSlabs = r.gauge("clipvisor_block_slabs", help: "Block slabs of the client connections (docs/protocol.md).")
        blockSlabBytes = r.gauge(
            "clipvisor_block_slab_bytes", help: "Bytes the block slabs hold, a slab a worker writes into at the room it was lent with.")
        quarantineEntries = r.gauge("clipvisor_quarantine_entries", help: "Clips currently quarantined.")
        r.gauge("clipvisor_build_info", labels: [("version", version)], help: "Always 1; the running version as a label.").set(to: 1.0)
        scraped = ScrapeTimeMetrics(registry: r)
    }

    // MARK: - Events (event loop)

    func request(_ op: String) {
        (requests[op] ?? requests["unknown"])?.increment()
    }

    func clip(outcome: String) { clips[outcome]?.increment() }

    func sample(failure: SkipReason?) { samples[failure?.rawValue ?? "ok"]?.increment() }

    func workerKilled(reason: String) {
        let key: String
        switch reason {
        case "deadline": key = "deadline"
        case "cancelled": key = "cancelled"
        case "start timeout": key = "start_timeout"
        case let r where r.hasPrefix("protocol"): key = "protocol"
        case "shutdown", "exit": key = "shutdown"
        default: key = "other"
        }
        kills[key]?.increment()
    }

    /// Worker counts by state, and the pids whose CPU time is summed at scrape time.
    func publishWorkers(_ counts: [String: Int], livePIDs: [Int32]) {
        for (state, gauge) in workers { gauge.set(Double(counts[state] ?? 0)) }
        scraped.setWorkerPIDs(livePIDs)
    }

    // MARK: - Text (any thread)

    /// The Prometheus text exposition format (version 0.0.4), process metrics refreshed first.
    func text() -> String {
        scraped.refresh()
        return registry.emitToString()
    }

    /// The `Content-Type` of `text()`.
    static let contentType = "text/plain; version=0.0.4; charset=utf-8"
}

/// Metrics read from the kernel when scraped, not from the event loop: the standard `process_*`
/// set for the supervisor itself and the CPU time of its workers (reaped ones from
/// RUSAGE_CHILDREN, live ones from /proc). Counters only move forward: a scrape adds the
/// difference from the previous one, under the mutex so two scrapes cannot add it twice.
final class ScrapeTimeMetrics: Sendable {
    private let cpu: Counter
    private let workerCPU: Counter
    private let resident: Gauge
    private let virtual: Gauge
    private let openFDs: Gauge
    private let maxFDs: Gauge
    private let threads: Gauge
    private struct State {
        var cpuSeconds = 0.0
        var workerCPUSeconds = 0.0
        var workerPIDs: [Int32] = []
    }
    private let state = Mutex(State())

    init(registry r: PrometheusCollectorRegistry) {
        cpu = r.counter("process_cpu_seconds_total", help: "Total user and system CPU time spent in seconds.")
        workerCPU = r.counter("clipvisor_worker_cpu_seconds_total", help: "User and system CPU time of all decode workers, live and exited.")
        resident = r.gauge("process_resident_memory_bytes", help: "Resident memory size in bytes.")
        virtual = r.gauge("process_virtual_memory_bytes", help: "Virtual memory size in bytes.")
        openFDs = r.gauge("process_open_fds", help: "Number of open file descriptors.")
        maxFDs = r.gauge("process_max_fds", help: "Maximum number of open file descriptors.")
        threads = r.gauge("process_threads", help: "Number of OS threads in the process.")
        let start = r.gauge("process_start_time_seconds", help: "Start time of the process since unix epoch in seconds.")
        if let stat = ProcStat.read(pid: nil) { start.set(stat.startTimeSeconds) }
    }

    func setWorkerPIDs(_ pids: [Int32]) {
        state.withLock { $0.workerPIDs = pids }
    }

    func refresh() {
        let own = ProcStat.read(pid: nil)
        if let own {
            resident.set(Double(own.residentBytes))
            virtual.set(Double(own.virtualBytes))
            threads.set(Double(own.threads))
        }
        openFDs.set(Double(ProcStat.openFileCount()))
        maxFDs.set(Double(ProcStat.maxFileCount()))
        // /proc is read outside the mutex: the event loop takes it to publish worker pids and
        // must never wait for file reads.
        let pids = state.withLock { $0.workerPIDs }
        var workers = ProcStat.reapedChildrenCPUSeconds()
        for pid in pids { workers += ProcStat.read(pid: pid)?.cpuSeconds ?? 0 }
        state.withLock { state in
            if let own, own.cpuSeconds > state.cpuSeconds {
                cpu.increment(by: own.cpuSeconds - state.cpuSeconds)
                state.cpuSeconds = own.cpuSeconds
            }
            // A worker reaped between the two reads is briefly missing from both sums; the
            // counter then waits until the total passes its old value instead of going back.
            if workers > state.workerCPUSeconds {
                workerCPU.increment(by: workers - state.workerCPUSeconds)
                state.workerCPUSeconds = workers
            }
        }
    }
}

extension PrometheusCollectorRegistry {
    /// A metric named in full (`clipvisor_clips_total`): our names already carry their unit.
    fileprivate static func descriptor(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }

    fileprivate func counter(_ name: String, labels: [(String, String)] = [], help: String) -> Counter {
        makeCounter(descriptor: Self.descriptor(name, help), labels: labels)
    }

    fileprivate func gauge(_ name: String, labels: [(String, String)] = [], help: String) -> Gauge {
        makeGauge(descriptor: Self.descriptor(name, help), labels: labels)
    }

    fileprivate func histogram(_ name: String, labels: [(String, String)], buckets: [Double], help: String) -> ValueHistogram {
        makeValueHistogram(descriptor: Self.descriptor(name, help), labels: labels, buckets: buckets)
    }
}
