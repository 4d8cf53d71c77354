import Logging
import Shared

/// Every knob of `clipvisor serve`, once: its TOML key, its flag, the values it takes, what it
/// does, its default, the example file's value, and where it goes in the settings. The flags'
/// --help (ServeCommand), the parsing of the file and the flags (ConfigFile, ServeSettings), the
/// example file (systemd/clipvisor.toml) and the docs' table (docs/configuration.md) all come
/// from here; `ConfigReferenceTests` checks that the committed files are what this table makes.
extension ConfigKey {
    static let table: [ConfigKey] = [
        ConfigKey(
            name: "socket", flag: "--socket", kind: .path,
            help: """
                Unix socket to listen on. Ignored when systemd passes the socket (clipvisor.socket), which is how \
                the service normally runs; used when the service is started without its socket unit.
                """,
            defaultText: "$CLIPVISOR_SOCKET, else $RUNTIME_DIRECTORY/clipvisor.sock, else the per-user socket",
            example: "\"/run/clipvisor/clipvisor.sock\"",
            apply: { settings, value in if case .string(let path) = value { settings.configuration.socketPath = path } }),
        ConfigKey(
            name: "roots", flag: "--root", kind: .paths,
            help: """
                Data roots: absolute paths (the flag is repeated, one root each). With roots, a clip whose real path \
                (symlinks and `..` resolved; for a passed fd, the file it refers to) is outside every root is \
                answered `permission` and logged with the client's uid and pid. Empty: everything the service user \
                can read. Example: roots = ["/data/train", "/mnt/datasets"].
                """,
            defaultText: "none (no path policy)", example: "[]",
            apply: { settings, value in if case .strings(let paths) = value { settings.configuration.roots = paths } }),
        ConfigKey(
            name: "worker", flag: "--worker", kind: .path,
            help: "The clipvisor-worker executable.",
            defaultText: "next to the clipvisor binary", example: "\"/usr/local/bin/clipvisor-worker\"",
            apply: { settings, value in if case .string(let path) = value { settings.configuration.workerExecutable = path } }),
        ConfigKey(
            name: "workers", flag: "--workers", kind: .integer(1...1024),
            help: "Decode workers (processes): at most this many clips decode at once, one per worker.",
            defaultText: "the CPUs available to the process (affinity mask and cgroup quota)", example: "8",
            apply: { settings, value in if case .integer(let count) = value { settings.configuration.workers = count } }),
        ConfigKey(
            name: "spare_workers", flag: "--spare-workers", kind: .integer(0...64),
            help: """
                Idle workers kept started beyond `workers`, so a clip never waits for a replacement after a kill \
                or a recycle (about 1 ms from the fork server, 30-700 ms with exec under load); at most `workers` \
                decode at once. Kills come in bursts when a \
                batch of clips shares one deadline.
                """,
            defaultText: "2", example: "2",
            apply: { settings, value in if case .integer(let count) = value { settings.configuration.spareWorkers = count } }),
        ConfigKey(
            name: "max_workers", flag: "--max-workers", kind: .integer(1...4096),
            help: """
                Hard cap on worker processes. A worker blocked in I/O (a FIFO, a stalled network mount) uses no \
                CPU, so its decode slot is lent to the next clip and a spare takes its place until its deadline; \
                this bounds how many can pile up.
                """,
            defaultText: "4 × workers and at least 16, never below workers + spare_workers", example: "32",
            apply: { settings, value in if case .integer(let count) = value { settings.configuration.maxWorkers = count } }),
        ConfigKey(
            name: "clips_per_worker", flag: "--clips-per-worker", kind: .integer(1...1_000_000),
            help: "A worker exits and is replaced after this many clips (bounds leaks in codecs).",
            defaultText: "100", example: "100",
            apply: { settings, value in if case .integer(let count) = value { settings.configuration.clipsPerWorker = count } }),
        ConfigKey(
            name: "deadline", flag: "--deadline", kind: .seconds(lower: 0, lowerInclusive: false, upper: 86_400),
            help: """
                Per-clip wall-clock deadline, seconds, from the moment a worker takes the clip; past it the \
                worker's process group is killed and the clip answered `timeout`.
                """,
            defaultText: "30", example: "30",
            apply: { settings, value in settings.configuration.deadlineDefaultMs = milliseconds(value) ?? settings.configuration.deadlineDefaultMs }),
        ConfigKey(
            name: "max_deadline", flag: "--max-deadline", kind: .seconds(lower: 0, lowerInclusive: false, upper: 86_400),
            help: "The largest deadline a request may ask for (`deadline_ms`), seconds.",
            defaultText: "600", example: "600",
            apply: { settings, value in settings.configuration.deadlineMaxMs = milliseconds(value) ?? settings.configuration.deadlineMaxMs }),
        ConfigKey(
            name: "queue_limit", flag: "--queue-limit", kind: .integer(1...10_000_000),
            help: "Clips that may wait for a free worker; beyond it requests are answered `overloaded`.",
            defaultText: "4096", example: "4096",
            apply: { settings, value in if case .integer(let count) = value { settings.configuration.queueLimit = count } }),
        ConfigKey(
            name: "queue_wait", flag: "--queue-wait", kind: .seconds(lower: 0, lowerInclusive: false, upper: 86_400),
            help: "How long a clip may wait for a free worker before it is answered `overloaded`, seconds.",
            defaultText: "60", example: "60",
            apply: { settings, value in settings.configuration.queueWaitMs = milliseconds(value) ?? settings.configuration.queueWaitMs }),
        ConfigKey(
            name: "worker_memory", flag: "--worker-memory", kind: .integer(64...(1 << 30)),
            help: """
                Address-space limit of each worker (RLIMIT_AS), MiB: an allocation beyond it fails and the clip is \
                answered `out_of_memory`. Virtual memory, not RSS (a worker maps ~135 libraries).
                """,
            defaultText: "16384", example: "8192",
            apply: { settings, value in if case .integer(let mib) = value { settings.configuration.workerAddressSpaceMB = mib } }),
        ConfigKey(
            name: "worker_cpu_seconds", flag: "--worker-cpu-seconds", kind: .integer(1...(1 << 31)),
            help: "CPU-time limit of each worker over its life (RLIMIT_CPU), seconds.",
            defaultText: "3600", example: "3600",
            apply: { settings, value in if case .integer(let seconds) = value { settings.configuration.workerCPUSeconds = seconds } }),
        ConfigKey(
            name: "worker_open_files", flag: "--worker-open-files", kind: .integer(16...(1 << 20)),
            help: "Open-file limit of each worker (RLIMIT_NOFILE).",
            defaultText: "256", example: "256",
            apply: { settings, value in if case .integer(let count) = value { settings.configuration.workerOpenFiles = count } }),
        ConfigKey(
            name: "sandbox", flag: "--sandbox", kind: .mode(WorkerMessage.LandlockMode.allCases.map(\.rawValue)),
            help: """
                The workers' Landlock write ban: "auto" applies it where the kernel and the container allow it and \
                otherwise decodes with no_new_privs and the resource limits only (said once in the log and shown in \
                `clipvisor status`); "required" decodes nothing without it; "off" only for debugging (also \
                --no-sandbox). In the file, true and false (from older files) mean "auto" and "off".
                """,
            defaultText: "\"auto\"", example: "\"auto\"",
            apply: { settings, value in
                if case .string(let text) = value, let mode = WorkerMessage.LandlockMode(rawValue: text) {
                    settings.configuration.landlock = mode
                }
            }),
        ConfigKey(
            name: "worker_start", flag: "--worker-start", kind: .mode(WorkerStartMode.allCases.map(\.rawValue)),
            help: """
                How workers start. "fork-server": one worker process, linked against FFmpeg once, clones each new \
                worker in well under a millisecond (exec costs ~25 ms of CPU, paid again after every crash, timeout \
                and failed clip); each clone applies the full sandbox itself. "exec": every worker is exec'd and gets \
                its own address-space layout (ASLR), at that cost. When the fork server fails, workers are exec'd \
                (said in the log and in `clipvisor status`) and the fork server is tried again at the first worker start 30 s or more later.
                """,
            defaultText: "\"fork-server\"", example: "\"fork-server\"",
            apply: { settings, value in
                if case .string(let text) = value, let mode = WorkerStartMode(rawValue: text) {
                    settings.configuration.workerStart = mode
                }
            }),
        ConfigKey(
            name: "after_refused_media", flag: "--after-refused-media", kind: .mode(AfterRefusedMedia.allCases.map(\.rawValue)),
            help: """
                What happens to a worker after media it refused (`decode_error`, `unsupported`, `too_large`). \
                "replace": it exits and a fresh one takes its place, in case the media left state behind (a clip \
                then costs a worker start and a cold first clip, ~5-30 ms of CPU). "keep": it stays; should it crash \
                later, the clip it crashed on is decoded again on a fresh worker before the crash is blamed on it \
                (the log names the refused clip when that retry succeeds). Worth it when many clips are damaged.
                """,
            defaultText: "\"replace\"", example: "\"replace\"",
            apply: { settings, value in
                if case .string(let text) = value, let mode = AfterRefusedMedia(rawValue: text) {
                    settings.configuration.afterRefusedMedia = mode
                }
            }),
        ConfigKey(
            name: "max_source_pixels", flag: "--max-source-pixels", kind: .integer(1...(1 << 40)),
            help: "Refuse sources with more pixels per frame than this (`too_large`).",
            defaultText: "67108864 (8192²)", example: "67_108_864",
            apply: { settings, value in if case .integer(let pixels) = value { settings.configuration.maxSourcePixels = pixels } }),
        ConfigKey(
            name: "max_output_bytes", flag: "--max-output-bytes", kind: .integer(1...(1 << 50)),
            help: """
                Refuse clips whose decoded tensors would exceed this many bytes (`too_large`). Every block lives in a \
                memfd charged to the service's memory cgroup until the client closes it, so this bounds MemoryMax= \
                (docs/systemd.md).
                """,
            defaultText: "2147483648 (2 GiB)", example: "1_073_741_824",
            apply: { settings, value in if case .integer(let bytes) = value { settings.configuration.maxOutputBytes = bytes } }),
        ConfigKey(
            name: "memory_budget", flag: "--memory-budget", kind: .integer(1...(1 << 50)),
            help: """
                Bytes of finished blocks held for clients that have not read them yet; past it no new clip is \
                dispatched until clients catch up.
                """,
            defaultText: "workers × max_output_bytes", example: "4_294_967_296",
            apply: { settings, value in if case .integer(let bytes) = value { settings.configuration.memoryBudgetBytes = bytes } }),
        ConfigKey(
            name: "block_slabs", flag: "--block-slabs", kind: .integer(0...BlockSlabs.maxPerConnection),
            help: """
                Block slabs per client connection: shared-memory files that its clips' blocks are written into and \
                reused, so that a steady stream of clips allocates, maps and frees no memory per clip (on a VM that \
                costs more than copying the bytes). A client asks for up to this many in its hello; clips beyond them, \
                clips passed as fds and blocks over 64 MiB get a fresh sealed memfd each. A slab is sealed against \
                shrinking but stays writable: a worker compromised by its media could alter a later block of the \
                same client before it is read. 0: every block is a fresh sealed memfd (docs/protocol.md, "Block slabs").
                """,
            defaultText: "4", example: "4",
            apply: { settings, value in if case .integer(let count) = value { settings.configuration.blockSlabs = count } }),
        ConfigKey(
            name: "block_slab_memory", flag: "--block-slab-memory", kind: .integer(1...(1 << 50)),
            help: """
                Bytes all block slabs may hold together. Slabs keep their pages while their connection lives (a \
                slab is as large as the largest block it held); a clip that finds no room gets a fresh memfd.
                """,
            defaultText: "1073741824 (1 GiB)", example: "1_073_741_824",
            apply: { settings, value in if case .integer(let bytes) = value { settings.configuration.blockSlabMemory = bytes } }),
        ConfigKey(
            name: "grace", flag: "--grace", kind: .seconds(lower: 0, lowerInclusive: true, upper: 3_600),
            help: """
                On SIGTERM (systemctl stop), how long clips in flight may finish, seconds. Keep it below the unit's \
                TimeoutStopSec= minus ~5 s.
                """,
            defaultText: "10", example: "10",
            apply: { settings, value in settings.configuration.gracePeriodMs = milliseconds(value) ?? settings.configuration.gracePeriodMs }),
        ConfigKey(
            name: "skip_log", flag: "--skip-log", kind: .path,
            help: "The skip log (JSON lines, durable before each client is answered; SIGHUP reopens it).",
            defaultText: "$STATE_DIRECTORY/skips.jsonl (/var/lib/clipvisor/skips.jsonl under systemd), else $XDG_STATE_HOME/clipvisor/skips.jsonl or ~/.local/state/clipvisor/skips.jsonl",
            example: "\"/var/lib/clipvisor/skips.jsonl\"",
            apply: { settings, value in if case .string(let path) = value { settings.skipLogPath = path } }),
        ConfigKey(
            name: "quarantine_timeouts", flag: "--quarantine-timeouts", kind: .integer(1...1_000),
            help: """
                Timeouts of an unchanged file before it is quarantined (answered `quarantined` at once); a crash or \
                an out-of-memory quarantines at the first time.
                """,
            defaultText: "2", example: "2",
            apply: { settings, value in if case .integer(let count) = value { settings.quarantine.timeoutsToQuarantine = count } }),
        ConfigKey(
            name: "quarantine_expiry", flag: "--quarantine-expiry", kind: .duration,
            help: "How long quarantine lasts: \"90s\", \"15m\", \"12h\", \"7d\", \"2w\".",
            defaultText: "\"7d\"", example: "\"7d\"",
            apply: { settings, value in
                if case .string(let text) = value, let ms = Timestamp.parseDuration(text) { settings.quarantine.expiryMs = ms }
            }),
        ConfigKey(
            name: "quarantine_import", flag: "--quarantine-import", kind: .path,
            help: """
                A merged skip ledger of the whole cluster (`clipvisor skips --merge ... --json`, gathered on shared \
                storage): clips it shows crashing, or timing out quarantine_timeouts times across all nodes, are \
                answered `quarantined` at once here too. Re-read when it changes and on SIGHUP; a missing file is \
                reported in `clipvisor status`, not an error.
                """,
            defaultText: "none", example: "\"/var/lib/clipvisor/cluster-ledger.jsonl\"",
            apply: { settings, value in if case .string(let path) = value { settings.quarantineImportPath = path } }),
        ConfigKey(
            name: "log_level", flag: "--log-level", kind: .choice(Logger.Level.allCases.map(\.rawValue)),
            help: "Log level: \"trace\", \"debug\", \"info\", \"notice\", \"warning\", \"error\", \"critical\".",
            defaultText: "\"info\"", example: "\"info\"",
            apply: { settings, value in
                if case .string(let text) = value, let level = Logger.Level(rawValue: text) { settings.logLevel = level }
            }),
        ConfigKey(
            name: "log_target", flag: "--log-target", kind: .choice(LogTarget.allCases.map(\.rawValue)),
            help: """
                Where logs go: "auto" (structured journal entries when stderr is the journal, as under systemd; plain \
                stderr lines otherwise), "journal", "stderr".
                """,
            defaultText: "\"auto\"", example: "\"auto\"",
            apply: { settings, value in
                if case .string(let text) = value, let target = LogTarget(rawValue: text) { settings.logTarget = target }
            }),
        ConfigKey(
            name: "metrics_listen", flag: "--metrics-listen", kind: .listenAddress,
            help: """
                Prometheus metrics over HTTP at this address's /metrics: "127.0.0.1:9464", "[::1]:9464", a bare port \
                (loopback), or "off". Only IP literals: the socket binds exactly this address. Under the systemd \
                unit it also needs systemd/clipvisor.service.d/metrics.conf.example (the unit has no network \
                otherwise). See docs/operations.md.
                """,
            defaultText: "\"off\"", example: "\"off\"",
            apply: { settings, value in
                if case .string(let text) = value { settings.metricsListen = text == "off" ? nil : try? MetricsAddress.parse(text).get() }
            }),
        ConfigKey(
            name: "metrics_textfile", flag: "--metrics-textfile", kind: .pathOrOff,
            help: """
                Also write the metrics text to this file (temp file + rename) for node_exporter's textfile collector, \
                e.g. "/var/lib/node_exporter/textfile/clipvisor.prom" (the unit then needs ReadWritePaths= for that \
                directory), or "off".
                """,
            defaultText: "\"off\"", example: "\"off\"",
            apply: { settings, value in if case .string(let path) = value { settings.metricsTextfile = path == "off" ? nil : path } }),
        ConfigKey(
            name: "metrics_interval", flag: "--metrics-interval", kind: .seconds(lower: 0, lowerInclusive: false, upper: 3_600),
            help: "How often metrics_textfile is rewritten, seconds.",
            defaultText: "15", example: "15",
            apply: { settings, value in settings.metricsIntervalMs = milliseconds(value) ?? settings.metricsIntervalMs }),
    ]

    /// Seconds (a `.number`) as whole milliseconds.
    private static func milliseconds(_ value: ConfigValue) -> Int? {
        guard case .number(let seconds) = value else { return nil }
        return Int((seconds * 1000).rounded())
    }
}

extension ConfigKey {
    /// The knob `name`; a programming error when there is none.
    static func named(_ name: String) -> ConfigKey {
        guard let key = byName[name] else { preconditionFailure("no config key \(name)") }
        return key
    }

    /// The knob a `ServeCommand` property stands for: `maxWorkers` (or its wrapper's storage,
    /// `_maxWorkers`) is `max_workers`.
    static func name(ofProperty label: String) -> String {
        var name = ""
        for character in label.drop(while: { $0 == "_" }) {
            if character.isUppercase {
                name += "_" + character.lowercased()
            } else {
                name.append(character)
            }
        }
        return name
    }
}
