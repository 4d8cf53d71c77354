import CClipvisorShims
import Logging
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// One decode worker: a `clipvisor-worker serve` child in its own process group, reached
/// through a SOCK_SEQPACKET control socket and watched through a pidfd.
final class WorkerProcess {
    enum State {
        /// Spawned; waiting for its `ready` message until the deadline.
        case starting(deadline: Instant)
        case idle
        /// Decoding `job` until `deadline`.
        case busy(job: JobID, deadline: Instant)
        /// Said it exits after its last reply; waiting for the exit.
        case retiring
        /// SIGKILL sent; waiting for the exit. `reason` is for logs and status.
        case killed(reason: String, at: Instant)
    }

    let id: UInt64
    let pid: pid_t
    let pidfd: FileDescriptor
    let control: FileDescriptor
    let spawnedAt: Instant
    var state: State
    var clipsDone = 0
    /// Landlock ABI the worker reported in `ready` (0: writes not restricted).
    var landlockABI = 0
    /// Why the worker runs without the Landlock write ban, as it said in `ready`.
    var landlockProblem: String?
    /// The thread that serves jobs (`ready`'s `thread`), when it is not the first one.
    var servingThread: pid_t?
    /// CPU use on the clip it decodes (set when it takes one): a worker that uses no CPU is
    /// blocked in I/O, and its slot is lent (`WorkerPool.Census.stalled`).
    var cpu: CPUWatch?
    /// The first clip whose media this worker refused (`WorkerAftermath.suspect`). It kept
    /// serving; a crash of it later is retried on a fresh worker before it is blamed.
    var refusedMedia: String?
    /// Whether its control socket is still registered and open.
    var controlOpen = true
    /// The block slab it was given with its clip. Taken back when it answers, or only when it
    /// is gone if it was killed or broke the protocol: until then it may still write into it.
    var lentSlab: BlockSlab?

    init(id: UInt64, pid: pid_t, pidfd: FileDescriptor, control: FileDescriptor, startDeadline: Instant) {
        self.id = id
        self.pid = pid
        self.pidfd = pidfd
        self.control = control
        self.spawnedAt = Instant.now()
        self.state = .starting(deadline: startDeadline)
    }

    /// Counts toward the pool's size: a worker being killed or retiring is already replaced.
    var isLive: Bool {
        switch state {
        case .starting, .idle, .busy: true
        case .retiring, .killed: false
        }
    }

    /// Busy on a clip but using (almost) no CPU over the last window: blocked in I/O.
    var isStalled: Bool {
        guard case .busy = state else { return false }
        return cpu?.stalled == true
    }

    var stateName: String {
        switch state {
        case .starting: "starting"
        case .idle: "idle"
        case .busy: "busy"
        case .retiring: "retiring"
        case .killed: "killed"
        }
    }

    /// SIGKILL to the worker's whole process group and to the process itself through its pidfd
    /// (the pidfd can never hit a recycled pid; the group catches anything it forked). Safe to
    /// repeat. The pgid cannot be reused before we reap the leader, which we have not yet done.
    func kill(reason: String) {
        _ = Glibc.kill(-pid, SIGKILL)
        _ = cv_pidfd_send_signal(pidfd.rawValue, SIGKILL)
        if case .killed = state { return }
        state = .killed(reason: reason, at: Instant.now())
    }

    /// How a reaped worker ended.
    enum Exit: Equatable, CustomStringConvertible {
        case exited(Int32)
        case signaled(Int32)

        var description: String {
            switch self {
            case .exited(let code): "exited with code \(code)"
            case .signaled(let signal): "killed by \(signalName(signal))"
            }
        }
    }

    /// Reaps the worker if it has exited.
    func reap() -> Exit? { Self.reap(pidfd: pidfd) }

    /// Reaps the child behind `pidfd` if it has exited (`waitid(P_PIDFD, WNOHANG)`).
    static func reap(pidfd: FileDescriptor) -> Exit? {
        var code: Int32 = 0
        var status: Int32 = 0
        let rc = cv_waitid_pidfd(pidfd.rawValue, &code, &status)
        guard rc == 1 else { return nil }
        return code == cv_cld_exited() ? .exited(status) : .signaled(status)
    }
}

/// "SIGSEGV" for 11.
func signalName(_ signal: Int32) -> String {
    if let abbreviation = cv_signal_name(signal) { return "SIG" + String(cString: abbreviation) }
    return "signal \(signal)"
}

/// posix_spawn(3) of `executable` with `arguments` (argv[0] is the executable) and this
/// process's environment plus `extraEnvironment` ("NAME=value"): the one place C strings are
/// built for a child's argv.
enum Spawn {
    static func start(
        _ executable: String, _ arguments: [String], extraEnvironment: [String] = [],
        actions: UnsafePointer<posix_spawn_file_actions_t>? = nil, attributes: UnsafePointer<posix_spawnattr_t>? = nil
    ) -> Result<pid_t, Errno> {
        var cArguments: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in cArguments { free(pointer) } }
        var pid: pid_t = 0
        guard !extraEnvironment.isEmpty else {
            let rc = posix_spawn(&pid, executable, actions, attributes, &cArguments, cv_environ())
            return rc == 0 ? .success(pid) : .failure(Errno(rawValue: rc))
        }
        var inherited: [UnsafeMutablePointer<CChar>?] = []
        var entry = cv_environ()
        while let variable = entry.pointee {
            inherited.append(variable)
            entry += 1
        }
        let added = extraEnvironment.map { strdup($0) }
        defer { for pointer in added { free(pointer) } }
        var environment = inherited + added + [nil]
        let rc = posix_spawn(&pid, executable, actions, attributes, &cArguments, &environment)
        return rc == 0 ? .success(pid) : .failure(Errno(rawValue: rc))
    }
}

/// What happens to a worker after media it refused (`after_refused_media`,
/// `WorkerAftermath.suspect`).
enum AfterRefusedMedia: String, CaseIterable, Sendable {
    /// DESIGN.md's rule: replaced, in case the media left state behind.
    case replace
    /// It stays; a crash of it later is retried on a fresh worker before it is blamed.
    case keep
}

/// How the supervisor starts workers (`worker_start`).
enum WorkerStartMode: String, CaseIterable, Sendable {
    /// Clone them from a fork server linked once (Shared/ForkServerProtocol.swift): a fresh
    /// worker costs well under a millisecond instead of ~25 ms of dynamic linking.
    case forkServer = "fork-server"
    /// exec `clipvisor-worker serve` for each: every worker gets its own address-space layout.
    case exec
}

/// Starts workers: cloned by the fork server, or exec'd with posix_spawn (vfork-like, cheap
/// from a large process) with the control socket as fd 3, /dev/null for stdin/stdout, every
/// other fd closed, a new process group, and signal mask and dispositions reset (the supervisor
/// blocks SIGTERM for signalfd). Either way the worker is the supervisor's child, watched
/// through a pidfd, and applies its own sandbox before it reads a job.
final class WorkerSpawner {
    /// Absolute path of `clipvisor-worker`.
    let executable: String
    /// `serve` and its limit options, without `--control-fd` and `--parent-pid`.
    let arguments: [String]
    let mode: WorkerStartMode
    private let logger: Logger
    /// The running fork server, in `.forkServer` mode.
    private(set) var forkServer: ForkServerProcess?
    /// Why workers are exec'd although the mode says fork server (shown in status); nil otherwise.
    private(set) var forkServerProblem: String?
    /// When a failed fork server is tried again: it is never retried in a tight loop.
    private var forkServerRetryAt: Instant?
    private(set) var forkServerStarts = 0
    /// Called before a fork server is stopped and its pidfd closed (the event loop unwatches it).
    var willStopForkServer: ((ForkServerProcess) -> Void)?

    struct SpawnError: Error, CustomStringConvertible {
        var description: String
    }

    init(executable: String, arguments: [String], mode: WorkerStartMode, logger: Logger) {
        self.executable = executable
        self.arguments = arguments
        self.mode = mode
        self.logger = logger
    }

    /// Launches the fork server if the mode wants one and none runs (after a failure, once its
    /// back-off has passed). Returns a newly launched one, whose pidfd and channel the caller
    /// watches; it is used once ready (`forkServerReadable`). `waitMs` > 0 waits that long for
    /// it to be ready: the supervisor's first spawn, so its first workers are clones too.
    func prepareForkServer(now: Instant, startTimeoutMs: Int, waitMs: Int32 = 0) -> ForkServerProcess? {
        guard mode == .forkServer, forkServer == nil else { return nil }
        if let retryAt = forkServerRetryAt, now < retryAt { return nil }
        let server: ForkServerProcess
        do {
            server = try ForkServerProcess.launch(
                startTimeoutMs: startTimeoutMs,
                exec: { control throws(SpawnError) in
                    // Bound eagerly once here, so no clone resolves a symbol lazily on its own.
                    try execWorker(control: control, extraArguments: ["--fork-server"], extraEnvironment: ["LD_BIND_NOW=1"])
                })
        } catch {
            forkServerFailed("cannot start the fork server: \(error)", now: now)
            return nil
        }
        forkServer = server
        forkServerStarts += 1
        forkServerRetryAt = nil
        if waitMs > 0 { forkServerReadable(now: now, waitMs: waitMs) }
        return forkServer === server ? server : nil  // nil: it failed while we waited (said, stopped)
    }

    /// Its channel became readable (or the caller checks on a starting one): the start
    /// message, or, once ready, something it should not have said.
    func forkServerReadable(now: Instant, waitMs: Int32 = 0) {
        guard let server = forkServer else { return }
        do throws(SpawnError) {
            if case .ready = server.state {
                try server.checkQuiet()
            } else if try server.readReady(now: now, waitMs: waitMs) {
                if forkServerProblem != nil {
                    logger.notice("fork server running again (pid \(server.pid)): workers are cloned from it")
                }
                forkServerProblem = nil
            }
        } catch {
            giveUp(server, because: error, now: now)
        }
    }

    /// The fork server exited on its own (its pidfd became readable): reap it and exec workers
    /// until the retry.
    func forkServerExited(now: Instant) {
        guard let server = forkServer else { return }
        let exit = stop(server)
        forkServerFailed("the fork server (pid \(server.pid)) \(exit.map(\.description) ?? "exited")", now: now)
    }

    /// At shutdown.
    func stopForkServer() {
        if let server = forkServer { stop(server) }
    }

    @discardableResult
    private func stop(_ server: ForkServerProcess) -> WorkerProcess.Exit? {
        willStopForkServer?(server)
        forkServer = nil
        return server.stop()
    }

    /// Stops a fork server that misbehaved and says why, with how it ended.
    private func giveUp(_ server: ForkServerProcess, because error: SpawnError, now: Instant) {
        let exit = stop(server)
        forkServerFailed("the fork server (pid \(server.pid)) failed: \(error)\(exit.map { " (\($0))" } ?? "")", now: now)
    }

    /// Said once per failure, loudly: workers still start (exec'd), only slower.
    private func forkServerFailed(_ problem: String, now: Instant) {
        forkServerProblem = problem
        forkServerRetryAt = now.adding(milliseconds: 30_000)
        logger.warning("\(problem); starting workers with exec (~25 ms of CPU each) and trying the fork server again at the first worker start after 30 s")
    }

    var statusJSON: JSONValue {
        [
            "mode": .string(mode.rawValue),
            "fork_server_pid": forkServer.map { .number(Double($0.pid)) } ?? .null,
            "fork_server_starts": .number(Double(forkServerStarts)),
            "forks": .number(Double(forkServer?.forks ?? 0)),
            "fork_server_ready": .bool(forkServer?.state == .ready),
            "problem": forkServerProblem.map { .string($0) } ?? .null,
        ]
    }

    func spawn(id: UInt64, startTimeoutMs: Int) throws(SpawnError) -> WorkerProcess {
        var pair: [Int32] = [-1, -1]
        guard cv_unix_seqpacket_pair(&pair, Int32(WorkerMessage.maxSize)) == 0 else {
            throw SpawnError(description: "socketpair failed: \(Errno(rawValue: errno))")
        }
        let parentEnd = FileDescriptor(rawValue: pair[0])
        let childEnd = pair[1]
        defer { close(childEnd) }
        _ = fcntl(parentEnd.rawValue, F_SETFL, fcntl(parentEnd.rawValue, F_GETFL) | O_NONBLOCK)

        if let server = forkServer, case .starting = server.state {
            forkServerReadable(now: Instant.now())  // ready by now, or past its start deadline
        }
        let pid: pid_t
        do {
            if let server = forkServer, server.state == .ready {
                do {
                    pid = try server.fork(control: childEnd)
                } catch {
                    giveUp(server, because: error, now: Instant.now())
                    pid = try execWorker(control: childEnd)
                }
            } else {
                pid = try execWorker(control: childEnd)
            }
        } catch {
            try? parentEnd.close()
            throw error
        }
        let pidfd = cv_pidfd_open(pid)
        guard pidfd >= 0 else {
            let error = Errno(rawValue: errno)
            _ = Glibc.kill(-pid, SIGKILL)
            _ = Glibc.kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            try? parentEnd.close()
            throw SpawnError(description: "pidfd_open(\(pid)) failed: \(error)")
        }
        _ = fcntl(pidfd, F_SETFD, FD_CLOEXEC)
        return WorkerProcess(
            id: id, pid: pid, pidfd: FileDescriptor(rawValue: pidfd), control: parentEnd,
            startDeadline: Instant.now().adding(milliseconds: startTimeoutMs))
    }

    /// posix_spawn of `clipvisor-worker serve` with `control` as its fd 3.
    private func execWorker(
        control: Int32, extraArguments: [String] = [], extraEnvironment: [String] = []
    ) throws(SpawnError) -> pid_t {
        var childEnd = control
        // dup2(3, 3) would keep FD_CLOEXEC and the worker would start without its socket.
        var moved: Int32 = -1
        if childEnd == 3 {
            moved = fcntl(3, F_DUPFD_CLOEXEC, 10)
            childEnd = moved
        }
        defer { if moved >= 0 { close(moved) } }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, childEnd, 3)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        _ = withUnsafeMutablePointer(to: &actions) { cv_spawn_file_actions_addclosefrom($0, 4) }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(
            &attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        posix_spawnattr_setpgroup(&attributes, 0)
        _ = withUnsafeMutablePointer(to: &attributes) { cv_spawnattr_reset_signals($0) }

        switch Spawn.start(
            executable, arguments + extraArguments + ["--control-fd", "3", "--parent-pid", String(getpid())],
            extraEnvironment: extraEnvironment, actions: &actions, attributes: &attributes)
        {
        case .success(let started): return started
        case .failure(let error): throw SpawnError(description: "cannot start \(executable): \(error)")
        }
    }
}
