import ArgumentParser
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
            (systemd), else $XDG_RUNTIME_DIR/clipvisor/clipvisor.sock or /tmp/clipvisor-$UID/clipvisor.sock; \
            it starts one worker per available CPU and finds clipvisor-worker next to itself.

            Every clip gets a wall-clock deadline from the moment a worker takes it; a worker that runs past \
            it is killed with its process group (SIGKILL) and the clip is answered `timeout`. Clip-level \
            skips are appended to the skip log before the client is answered. SIGTERM/SIGINT: stop \
            accepting, let clips in flight finish within --grace, answer the rest `cancelled`, exit 0. \
            SIGHUP: reopen the skip log (logrotate).
            """)

    @Option(help: ArgumentHelp("Unix socket to listen on.", valueName: "path"))
    var socket: String?

    @Option(help: ArgumentHelp("The clipvisor-worker executable (default: next to this one).", valueName: "path"))
    var worker: String?

    @Option(help: "Decode workers (default: CPUs available to this process, from the affinity mask and cgroup quota).")
    var workers: Int?

    @Option(help: "A worker is replaced after this many clips (bounds leaks in codecs).")
    var clipsPerWorker: Int = 100

    @Option(help: ArgumentHelp("Default per-clip deadline, seconds.", valueName: "seconds"))
    var deadline: Double = 30

    @Option(help: ArgumentHelp("Largest deadline a request may ask for, seconds.", valueName: "seconds"))
    var maxDeadline: Double = 600

    @Option(help: "Clips that may wait for a worker; beyond it requests are answered `overloaded`.")
    var queueLimit: Int = 4096

    @Option(help: ArgumentHelp("How long a clip may wait for a worker before it is answered `overloaded`, seconds.", valueName: "seconds"))
    var queueWait: Double = 60

    @Option(help: ArgumentHelp("Address-space limit of each worker (RLIMIT_AS), MiB.", valueName: "MiB"))
    var workerMemory: Int = 16_384

    @Option(help: ArgumentHelp("CPU-time limit of each worker over its life (RLIMIT_CPU), seconds.", valueName: "seconds"))
    var workerCpuSeconds: Int = 3600

    @Option(help: "Open-file limit of each worker (RLIMIT_NOFILE).")
    var workerOpenFiles: Int = 256

    @Flag(help: "Run workers without the Landlock write ban and no_new_privs (debugging only).")
    var noSandbox = false

    @Option(help: "Refuse sources with more pixels per frame than this (`too_large`).")
    var maxSourcePixels: Int = 8192 * 8192

    @Option(help: ArgumentHelp("Refuse clips whose tensors would exceed this many bytes (`too_large`).", valueName: "bytes"))
    var maxOutputBytes: Int = 2 << 30

    @Option(help: ArgumentHelp("Bytes of finished blocks held for slow clients before dispatch pauses (default: workers × max output).", valueName: "bytes"))
    var memoryBudget: Int?

    @Option(help: ArgumentHelp("On SIGTERM, how long clips in flight may finish, seconds.", valueName: "seconds"))
    var grace: Double = 10

    @Option(help: ArgumentHelp("Skip log (default $STATE_DIRECTORY/skips.jsonl, else $XDG_STATE_HOME/clipvisor/skips.jsonl, else ~/.local/state/clipvisor/skips.jsonl).", valueName: "path"))
    var skipLog: String?

    @Option(help: "Timeouts of an unchanged file before it is quarantined (a crash or OOM quarantines at once).")
    var quarantineTimeouts: Int = 2

    @Option(help: ArgumentHelp("How long quarantine lasts, e.g. 7d, 12h.", valueName: "duration"))
    var quarantineExpiry: String = "7d"

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func validate() throws {
        if let workers, workers < 1 || workers > 1024 { throw ValidationError("--workers must be in 1...1024") }
        guard clipsPerWorker >= 1 else { throw ValidationError("--clips-per-worker must be at least 1") }
        guard deadline > 0, maxDeadline >= deadline else { throw ValidationError("need 0 < --deadline ≤ --max-deadline") }
        guard queueLimit >= 1, queueWait > 0 else { throw ValidationError("--queue-limit and --queue-wait must be positive") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level \(logLevel)") }
        guard Timestamp.parseDuration(quarantineExpiry) != nil else {
            throw ValidationError("--quarantine-expiry: \(quarantineExpiry) is not a duration like 7d or 12h")
        }
    }

    func makeConfiguration() -> ServeConfiguration {
        var configuration = ServeConfiguration()
        if let socket { configuration.socketPath = socket }
        if let worker { configuration.workerExecutable = worker }
        if let workers { configuration.workers = workers }
        configuration.clipsPerWorker = clipsPerWorker
        configuration.deadlineDefaultMs = Int(deadline * 1000)
        configuration.deadlineMaxMs = Int(maxDeadline * 1000)
        configuration.queueLimit = queueLimit
        configuration.queueWaitMs = Int(queueWait * 1000)
        configuration.workerAddressSpaceMB = workerMemory
        configuration.workerCPUSeconds = workerCpuSeconds
        configuration.workerOpenFiles = workerOpenFiles
        configuration.workerSandbox = !noSandbox
        configuration.maxSourcePixels = maxSourcePixels
        configuration.maxOutputBytes = maxOutputBytes
        configuration.memoryBudgetBytes = memoryBudget
        configuration.gracePeriodMs = Int(grace * 1000)
        return configuration
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        var logger = Logger(label: "clipvisor")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        let configuration = makeConfiguration()
        guard access(configuration.workerExecutable, X_OK) == 0 else {
            throw CleanExit.message(
                "clipvisor: the decode worker \(configuration.workerExecutable) is missing or not executable (\(Errno(rawValue: errno))); pass --worker PATH")
        }
        let (listener, ownsSocket) = try SocketClaim.claim(configuration: configuration)
        var policy = QuarantinePolicy()
        policy.timeoutsToQuarantine = quarantineTimeouts
        policy.expiryMs = Timestamp.parseDuration(quarantineExpiry) ?? policy.expiryMs
        let log = SkipLog(path: skipLog ?? SkipLog.defaultPath, policy: policy, logger: logger)
        let supervisor = try Supervisor(
            configuration: configuration, listener: listener, ownsSocketFile: ownsSocket, skipLog: log, logger: logger)
        logger.info(
            "clipvisor \(ClipvisorVersion.string) serving on \(configuration.socketPath) with \(configuration.workers) workers; skip log \(log.path)")
        let code = supervisor.run()
        if code != 0 { throw ExitCode(code) }
    }
}

/// Takes the listening socket: the one systemd passed (LISTEN_FDS), or a new one at the
/// configured path after making sure no live supervisor owns it.
enum SocketClaim {
    struct Refusal: Error, CustomStringConvertible {
        var description: String
    }

    static func claim(configuration: ServeConfiguration) throws -> (FileDescriptor, ownsFile: Bool) {
        if let pidText = SocketDiscovery.environment("LISTEN_PID"), pid_t(pidText) == getpid(),
            let countText = SocketDiscovery.environment("LISTEN_FDS"), let count = Int(countText), count >= 1
        {
            let inherited = FileDescriptor(rawValue: 3)
            UnixSocket.prepareInherited(inherited)
            unsetenv("LISTEN_PID")
            unsetenv("LISTEN_FDS")
            unsetenv("LISTEN_FDNAMES")
            return (inherited, false)
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
            return (try UnixSocket.listen(at: path, mode: configuration.socketMode), true)
        } catch let error as Errno where error == .addressInUse {
            throw Refusal(description: "another clipvisor supervisor took \(path) just now")
        } catch {
            throw Refusal(description: "cannot listen on \(path): \(error)")
        }
    }
}
