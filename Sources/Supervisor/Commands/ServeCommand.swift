import CClipvisorShims
import ArgumentParser
import CSystemd
import Logging
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the supervisor: accept decode requests and hand each clip to a sandboxed worker under a hard deadline.",
        discussion: """
            Needs no configuration: it listens on $CLIPVISOR_SOCKET, else $RUNTIME_DIRECTORY/clipvisor.sock \
            (systemd), else $XDG_RUNTIME_DIR/clipvisor/clipvisor.sock or /tmp/clipvisor-$UID/clipvisor.sock \
            (a socket passed by systemd, LISTEN_FDS, wins over all of them); it starts one worker per \
            available CPU and finds clipvisor-worker next to itself.

            Settings come from the built-in defaults, then the --config file (TOML; every key is the \
            long option below with - turned into _, plus `roots`; see \
            systemd/clipvisor.toml), then the flags. A bad file is refused with its line and key \
            (exit status 78).

            Every clip gets a wall-clock deadline from the moment a worker takes it; a worker that runs past \
            it is killed with its process group (SIGKILL) and the clip is answered `timeout`. Clip-level \
            skips are appended to the skip log before the client is answered. SIGTERM/SIGINT: stop \
            accepting, let clips in flight finish within --grace, answer the rest `cancelled`, exit 0. \
            SIGHUP: reopen the skip log (logrotate).

            Under systemd (Type=notify) it sends READY=1 once the socket accepts and the pool is warm, \
            keeps STATUS= current, pings the watchdog from its event loop (WatchdogSec=) and sends \
            STOPPING=1 on shutdown; when stderr is the journal it logs structured entries (skips with \
            CLIP_PATH, SKIP_REASON, ELAPSED_MS, ...). See docs/systemd.md.
            """)

    /// Exit status for a configuration that cannot work (sysexits EX_CONFIG); the unit's
    /// RestartPreventExitStatus= lists it so a bad file does not restart in a loop.
    static let configurationExitCode: Int32 = 78

    @Option(help: ArgumentHelp("TOML config file; flags override it (e.g. /etc/clipvisor/clipvisor.toml).", valueName: "path"))
    var config: String?

    @Option(help: ArgumentHelp("Unix socket to listen on (ignored when systemd passes one).", valueName: "path"))
    var socket: String?

    @Option(name: .customLong("root"), help: ArgumentHelp(
        "A data root; repeat for several. Requests outside every root are refused (default: none, no path policy).",
        valueName: "path"))
    var roots: [String] = []

    @Option(help: ArgumentHelp("The clipvisor-worker executable (default: next to this one).", valueName: "path"))
    var worker: String?

    @Option(help: "Decode workers (default: CPUs available to this process, from the affinity mask and cgroup quota).")
    var workers: Int?

    @Option(help: """
        Idle workers kept ready beyond --workers, so a clip never waits for a replacement after a \
        kill or a recycle; at most --workers decode at once (default: 2: kills often come in bursts, when a batch of clips shares one deadline).
        """)
    var spareWorkers: Int?

    @Option(help: "A worker is replaced after this many clips, bounding leaks in codecs (default: 100).")
    var clipsPerWorker: Int?

    @Option(help: ArgumentHelp("Default per-clip deadline, seconds (default: 30).", valueName: "seconds"))
    var deadline: Double?

    @Option(help: ArgumentHelp("Largest deadline a request may ask for, seconds (default: 600).", valueName: "seconds"))
    var maxDeadline: Double?

    @Option(help: "Clips that may wait for a worker; beyond it requests are answered `overloaded` (default: 4096).")
    var queueLimit: Int?

    @Option(help: ArgumentHelp(
        "How long a clip may wait for a worker before it is answered `overloaded`, seconds (default: 60).", valueName: "seconds"))
    var queueWait: Double?

    @Option(help: ArgumentHelp("Address-space limit of each worker (RLIMIT_AS), MiB (default: 16384).", valueName: "MiB"))
    var workerMemory: Int?

    @Option(help: ArgumentHelp(
        "CPU-time limit of each worker over its life (RLIMIT_CPU), seconds (default: 3600).", valueName: "seconds"))
    var workerCpuSeconds: Int?

    @Option(help: "Open-file limit of each worker (RLIMIT_NOFILE) (default: 256).")
    var workerOpenFiles: Int?

    @Option(help: ArgumentHelp("""
        The workers' Landlock write ban: auto (apply it where the kernel and the container allow it; where a \
        seccomp filter or the kernel refuses it, decode with the remaining limits and say so once in the log and in \
        `status`), required (decode nothing without it), off (debugging only). no_new_privs and the resource \
        limits always apply (default: auto).
        """, valueName: "mode"))
    var sandbox: String?

    @Flag(help: "Same as --sandbox off.")
    var noSandbox = false

    @Option(help: "Refuse sources with more pixels per frame than this, `too_large` (default: 67108864, 8192×8192).")
    var maxSourcePixels: Int?

    @Option(help: ArgumentHelp(
        "Refuse clips whose tensors would exceed this many bytes, `too_large` (default: 2147483648, 2 GiB).", valueName: "bytes"))
    var maxOutputBytes: Int?

    @Option(help: ArgumentHelp(
        "Bytes of finished blocks held for slow clients before dispatch pauses (default: workers × max output).",
        valueName: "bytes"))
    var memoryBudget: Int?

    @Option(help: ArgumentHelp("On SIGTERM, how long clips in flight may finish, seconds (default: 10).", valueName: "seconds"))
    var grace: Double?

    @Option(help: ArgumentHelp(
        "Skip log (default $STATE_DIRECTORY/skips.jsonl, else $XDG_STATE_HOME/clipvisor/skips.jsonl, else ~/.local/state/clipvisor/skips.jsonl).",
        valueName: "path"))
    var skipLog: String?

    @Option(help: "Timeouts of an unchanged file before it is quarantined; a crash or OOM quarantines at once (default: 2).")
    var quarantineTimeouts: Int?

    @Option(help: ArgumentHelp("How long quarantine lasts, e.g. 7d, 12h (default: 7d).", valueName: "duration"))
    var quarantineExpiry: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical (default: info).")
    var logLevel: String?

    @Option(help: ArgumentHelp(
        "Where logs go: auto (the journal when stderr is the journal's stream), journal, stderr (default: auto).",
        valueName: "target"))
    var logTarget: String?

    /// The flags that were given, keyed by config-file key (`ConfigKey`).
    var flagValues: [String: ConfigValue] {
        var values: [String: ConfigValue] = [:]
        func put(_ name: String, _ value: ConfigValue?) { if let value { values[name] = value } }
        put("socket", socket.map { .string($0) })
        put("roots", roots.isEmpty ? nil : .strings(roots))
        put("worker", worker.map { .string($0) })
        put("workers", workers.map { .integer($0) })
        put("spare_workers", spareWorkers.map { .integer($0) })
        put("clips_per_worker", clipsPerWorker.map { .integer($0) })
        put("deadline", deadline.map { .number($0) })
        put("max_deadline", maxDeadline.map { .number($0) })
        put("queue_limit", queueLimit.map { .integer($0) })
        put("queue_wait", queueWait.map { .number($0) })
        put("worker_memory", workerMemory.map { .integer($0) })
        put("worker_cpu_seconds", workerCpuSeconds.map { .integer($0) })
        put("worker_open_files", workerOpenFiles.map { .integer($0) })
        put("sandbox", noSandbox ? .string(WorkerMessage.LandlockMode.off.rawValue) : sandbox.map { .string($0) })
        put("max_source_pixels", maxSourcePixels.map { .integer($0) })
        put("max_output_bytes", maxOutputBytes.map { .integer($0) })
        put("memory_budget", memoryBudget.map { .integer($0) })
        put("grace", grace.map { .number($0) })
        put("skip_log", skipLog.map { .string($0) })
        put("quarantine_timeouts", quarantineTimeouts.map { .integer($0) })
        put("quarantine_expiry", quarantineExpiry.map { .string($0) })
        put("log_level", logLevel.map { .string($0) })
        put("log_target", logTarget.map { .string($0) })
        return values
    }

    func validate() throws {
        if noSandbox, sandbox != nil { throw ValidationError("give --sandbox MODE or --no-sandbox, not both") }
        do {
            try ServeSettings.checkFlags(flagValues)
        } catch {
            throw ValidationError(error.description)
        }
    }

    /// Defaults < config file < flags. Throws a ConfigError naming the file, line and key.
    func resolveSettings() throws(ConfigError) -> ServeSettings {
        let file = try config.map { path throws(ConfigError) in try ConfigFile.load(path) }
        return try ServeSettings.resolve(file: file, flags: flagValues)
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        let notifier = SystemdNotifier.fromEnvironment()
        let settings: ServeSettings
        do {
            settings = try resolveSettings()
        } catch {
            notifier.send("STATUS=\(SystemdNotifier.statusValue("refusing the configuration: \(error)"))")
            Self.printError("clipvisor: refusing the configuration:\n" + error.problems.map { "  \($0)" }.joined(separator: "\n"))
            throw ExitCode(Self.configurationExitCode)
        }
        let useJournal = Journal.shouldUse(settings.logTarget)
        var logger = Logger(label: "clipvisor") { label in
            useJournal ? JournalLogHandler(label: label) as any LogHandler : StreamLogHandler.standardError(label: label)
        }
        logger.logLevel = settings.logLevel
        if settings.logTarget == .journal, !useJournal {
            logger.warning("log target journal, but \(Journal.socketPath) does not exist: logging to stderr")
        }
        let lifecycle = ServiceLifecycle(notifier: notifier, faults: ServiceFaults.fromEnvironment(), logger: logger)
        var configuration = settings.configuration
        guard access(configuration.workerExecutable, X_OK) == 0 else {
            let reason = "the decode worker \(configuration.workerExecutable) is missing or not executable (\(Errno(rawValue: errno))); pass --worker PATH or set worker in the config file"
            lifecycle.startFailed(reason)
            Self.printError("clipvisor: \(reason)")
            throw ExitCode(Self.configurationExitCode)
        }
        let listener: FileDescriptor
        let ownsSocket: Bool
        do {
            let claim = try SocketClaim.claim(configuration: configuration)
            (listener, ownsSocket) = (claim.fd, claim.ownsFile)
            configuration.socketPath = claim.path
        } catch {
            lifecycle.startFailed("\(error)")
            throw error
        }
        let log = SkipLog(path: settings.skipLogPath ?? SkipLog.defaultPath, policy: settings.quarantine, logger: logger)
        let supervisor = try Supervisor(
            configuration: configuration, listener: listener, ownsSocketFile: ownsSocket, skipLog: log, logger: logger)
        lifecycle.attach(to: supervisor)
        if useJournal { supervisor.skipAnnouncer = JournalSkipAnnouncer.announce }
        let roots = configuration.roots.isEmpty ? "no data roots" : "data roots \(configuration.roots.joined(separator: ", "))"
        logger.info(
            "clipvisor \(ClipvisorVersion.string) serving on \(configuration.socketPath)\(ownsSocket ? "" : " (passed by systemd)") with \(configuration.workers) workers; skip log \(log.path); \(roots)",
            metadata: config.map { ["config.file": "\($0)"] })
        let code = supervisor.run()
        if code != 0 { throw ExitCode(code) }
    }

    /// One message on fd 2 (the Glibc `stderr` global is not usable outside main.swift).
    static func printError(_ message: String) {
        let bytes = Array((message + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }
}

/// Takes the listening socket: the one systemd passed (LISTEN_FDS), or a new one at the
/// configured path after making sure no live supervisor owns it.
enum SocketClaim {
    struct Refusal: Error, CustomStringConvertible {
        var description: String
    }

    /// The listener, whether this process created its file (and so removes it at exit; never
    /// one systemd passed), and its path as the kernel reports it.
    struct Claim {
        var fd: FileDescriptor
        var ownsFile: Bool
        var path: String
    }

    /// The first fd systemd passes (sd_listen_fds(3)).
    static let listenFDsStart: Int32 = 3

    static func claim(configuration: ServeConfiguration) throws -> Claim {
        if let pidText = SocketDiscovery.environment("LISTEN_PID"), pid_t(pidText) == getpid(),
            let countText = SocketDiscovery.environment("LISTEN_FDS"), let count = Int32(countText), count >= 1
        {
            unsetenv("LISTEN_PID")
            unsetenv("LISTEN_FDS")
            unsetenv("LISTEN_FDNAMES")
            // One ListenStream= is all we serve; anything else passed is closed, not inherited by workers.
            for extra in (listenFDsStart + 1)..<(listenFDsStart + count) { close(extra) }
            guard sd_is_socket_unix(listenFDsStart, cv_sock_stream(), 1, nil, 0) > 0 else {
                throw Refusal(description: "LISTEN_FDS passed fd \(listenFDsStart), but it is not a listening Unix stream socket")
            }
            let inherited = FileDescriptor(rawValue: listenFDsStart)
            UnixSocket.prepareInherited(inherited)
            return Claim(fd: inherited, ownsFile: false, path: boundPath(of: inherited) ?? configuration.socketPath)
        }
        let path = configuration.socketPath
        let directory = SkipLogFiles.directory(of: path)
        if access(directory, F_OK) != 0 {
            Filesystem.makeDirectories(directory, mode: 0o700)
        }
        var info = stat()
        if lstat(path, &info) == 0 {
            guard (info.st_mode & S_IFMT) == S_IFSOCK else {
                throw Refusal(description: "\(path) exists and is not a socket; refusing to replace it")
            }
            do {
                let probe = try UnixSocket.connect(to: path)
                try? probe.close()
                throw Refusal(description: "another clipvisor supervisor is already serving on \(path)")
            } catch let refusal as Refusal {
                throw refusal
            } catch let error as Errno where error == .connectionRefused {
                // Nobody listens: a stale socket from a supervisor that died.
                unlink(path)
            } catch {
                throw Refusal(description: "cannot check the existing socket \(path): \(error)")
            }
        }
        do {
            return Claim(fd: try UnixSocket.listen(at: path, mode: configuration.socketMode), ownsFile: true, path: path)
        } catch let error as Errno where error == .addressInUse {
            throw Refusal(description: "another clipvisor supervisor took \(path) just now")
        } catch {
            throw Refusal(description: "cannot listen on \(path): \(error)")
        }
    }

    /// The path a Unix socket is bound to (getsockname), or nil for an unnamed/abstract one.
    static func boundPath(of fd: FileDescriptor) -> String? {
        var address = sockaddr_un()
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        let rc = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd.rawValue, $0, &length) }
        }
        guard rc == 0, address.sun_family == sa_family_t(AF_UNIX) else { return nil }
        let path = withUnsafeBytes(of: address.sun_path) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        return path.isEmpty ? nil : path
    }
}
