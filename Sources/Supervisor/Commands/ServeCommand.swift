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

    @Flag(help: "Print an example config file with every knob, its meaning and its default, and exit.")
    var printExampleConfig = false

    /// For docs/configuration.md.
    @Flag(help: .hidden)
    var printConfigTable = false

    // The knobs: each one's text, default and checks live in ConfigKey.table (ConfigTable.swift);
    // `flagValues` finds these properties by name, so a knob is declared here and there only.

    @Option(help: Self.knob("socket", "path"))
    var socket: String?

    @Option(name: .customLong("root"), help: Self.knob("roots", "path"))
    var roots: [String] = []

    @Option(help: Self.knob("worker", "path"))
    var worker: String?

    @Option(help: Self.knob("workers"))
    var workers: Int?

    @Option(help: Self.knob("spare_workers"))
    var spareWorkers: Int?

    @Option(help: Self.knob("max_workers"))
    var maxWorkers: Int?

    @Option(help: Self.knob("clips_per_worker"))
    var clipsPerWorker: Int?

    @Option(help: Self.knob("deadline", "seconds"))
    var deadline: Double?

    @Option(help: Self.knob("max_deadline", "seconds"))
    var maxDeadline: Double?

    @Option(help: Self.knob("queue_limit"))
    var queueLimit: Int?

    @Option(help: Self.knob("queue_wait", "seconds"))
    var queueWait: Double?

    @Option(help: Self.knob("worker_memory", "MiB"))
    var workerMemory: Int?

    @Option(help: Self.knob("worker_cpu_seconds", "seconds"))
    var workerCpuSeconds: Int?

    @Option(help: Self.knob("worker_open_files"))
    var workerOpenFiles: Int?

    @Option(help: Self.knob("sandbox", "mode"))
    var sandbox: String?

    @Flag(help: "Same as --sandbox off.")
    var noSandbox = false

    @Option(help: Self.knob("worker_start", "mode"))
    var workerStart: String?

    @Option(help: Self.knob("after_refused_media", "mode"))
    var afterRefusedMedia: String?

    @Option(help: Self.knob("max_source_pixels"))
    var maxSourcePixels: Int?

    @Option(help: Self.knob("max_output_bytes", "bytes"))
    var maxOutputBytes: Int?

    @Option(help: Self.knob("memory_budget", "bytes"))
    var memoryBudget: Int?

    @Option(help: Self.knob("block_slabs"))
    var blockSlabs: Int?

    @Option(help: Self.knob("block_slab_memory", "bytes"))
    var blockSlabMemory: Int?

    @Option(help: Self.knob("grace", "seconds"))
    var grace: Double?

    @Option(help: Self.knob("skip_log", "path"))
    var skipLog: String?

    @Option(help: Self.knob("quarantine_timeouts"))
    var quarantineTimeouts: Int?

    @Option(help: Self.knob("quarantine_expiry", "duration"))
    var quarantineExpiry: String?

    @Option(help: Self.knob("quarantine_import", "path"))
    var quarantineImport: String?

    @Option(help: Self.knob("log_level", "level"))
    var logLevel: String?

    @Option(help: Self.knob("log_target", "target"))
    var logTarget: String?

    @Option(help: Self.knob("metrics_listen", "address"))
    var metricsListen: String?

    @Option(help: Self.knob("metrics_textfile", "path"))
    var metricsTextfile: String?

    @Option(help: Self.knob("metrics_interval", "seconds"))
    var metricsInterval: Double?

    /// A knob's --help: the table's text and default.
    static func knob(_ name: String, _ valueName: String? = nil) -> ArgumentHelp {
        let key = ConfigKey.named(name)
        return ArgumentHelp("\(key.help) (default: \(key.defaultText))", valueName: valueName)
    }

    /// The knobs given as flags, keyed by config-file key: every `@Option` property whose name
    /// is a knob's (`maxWorkers` → `max_workers`), found by reflection so that no knob is listed
    /// twice. `--no-sandbox` is `sandbox = "off"`.
    var flagValues: [String: ConfigValue] {
        var values: [String: ConfigValue] = [:]
        for child in Mirror(reflecting: self).children {
            guard let label = child.label, let option = child.value as? KnobOption else { continue }
            let name = ConfigKey.name(ofProperty: label)
            guard ConfigKey.byName[name] != nil, let value = option.configValue else { continue }
            values[name] = value
        }
        if noSandbox { values["sandbox"] = .string(WorkerMessage.LandlockMode.off.rawValue) }
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
        if printExampleConfig || printConfigTable {
            print(printExampleConfig ? ConfigReference.exampleFile() : ConfigReference.markdownTable() + "\n", terminator: "")
            return
        }
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
        // After the Supervisor exists: its signalfd has blocked SIGTERM/SIGINT/SIGHUP in this
        // thread, and the metrics threads started here inherit that mask.
        let metricsServing: MetricsServing.Running
        do {
            metricsServing = try MetricsServing.start(settings, supervisor: supervisor, logger: logger)
        } catch {
            lifecycle.startFailed(error.description)
            Self.printError("clipvisor: \(error)")
            throw ExitCode(Self.configurationExitCode)
        }
        lifecycle.attach(to: supervisor)
        if let path = settings.quarantineImportPath {
            supervisor.quarantineImport = QuarantineImport(path: absolutePath(path), policy: settings.quarantine, logger: logger)
            supervisor.quarantineImport?.start()
        }
        let roots = configuration.roots.isEmpty ? "no data roots" : "data roots \(configuration.roots.joined(separator: ", "))"
        logger.info(
            "clipvisor \(ClipvisorVersion.string) serving on \(configuration.socketPath)\(ownsSocket ? "" : " (passed by systemd)") with \(configuration.workers) workers; skip log \(log.path); \(roots)",
            metadata: config.map { ["config.file": "\($0)"] })
        if let pages = BlockPages.line(BlockPages.statusJSON()) { logger.info("\(pages)") }
        let code = supervisor.run()
        metricsServing.stop()
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
        // sd_listen_fds(3) checks LISTEN_PID, unsets the variables (workers must not see them)
        // and marks the fds close-on-exec.
        let count = sd_listen_fds(1)
        if count < 0 {
            throw Refusal(description: "systemd passed sockets that cannot be used: sd_listen_fds: \(Errno(rawValue: -count))")
        }
        if count >= 1 {
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

/// An `@Option` of `serve` whose value is a knob's (see `ServeCommand.flagValues`).
protocol KnobOption {
    var configValue: ConfigValue? { get }
}

/// The value types the knob options have.
protocol KnobValue {
    var configValue: ConfigValue? { get }
}

extension Option: KnobOption where Value: KnobValue {
    var configValue: ConfigValue? { wrappedValue.configValue }
}

extension Optional: KnobValue where Wrapped: KnobScalar {
    var configValue: ConfigValue? { self?.scalarValue }
}

extension Array: KnobValue where Element == String {
    var configValue: ConfigValue? { isEmpty ? nil : .strings(self) }
}

/// A single knob value: an integer, seconds, or text.
protocol KnobScalar {
    var scalarValue: ConfigValue { get }
}

extension Int: KnobScalar {
    var scalarValue: ConfigValue { .integer(self) }
}

extension Double: KnobScalar {
    var scalarValue: ConfigValue { .number(self) }
}

extension String: KnobScalar {
    var scalarValue: ConfigValue { .string(self) }
}
