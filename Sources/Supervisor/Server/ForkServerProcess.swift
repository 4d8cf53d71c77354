import CClipvisorShims
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The supervisor's side of the fork server (Shared/ForkServerProtocol.swift). Requests are
/// synchronous: a clone takes well under a millisecond, less than the posix_spawn it replaces
/// already blocked the event loop for. A fork server that does not answer in time, answers
/// out of turn or dies is stopped and the spawner execs workers (WorkerSpawner says so in the log).
final class ForkServerProcess {
    let pid: pid_t
    let pidfd: FileDescriptor
    private let control: FileDescriptor
    private var nextRequest: UInt64 = 1
    private(set) var forks = 0
    /// How long a fork may take before the fork server is given up: generous, since a loaded
    /// machine can delay a runnable process by tens of milliseconds.
    static let forkTimeoutMs: Int32 = 2000

    private init(pid: pid_t, pidfd: FileDescriptor, control: FileDescriptor) {
        self.pid = pid
        self.pidfd = pidfd
        self.control = control
    }

    /// Execs the fork server through `exec` (given the child's end of its channel) and waits for
    /// its `fork_server_ready`.
    static func start(
        timeoutMs: Int, exec: (Int32) throws(WorkerSpawner.SpawnError) -> pid_t
    ) throws(WorkerSpawner.SpawnError) -> ForkServerProcess {
        var pair: [Int32] = [-1, -1]
        guard cv_unix_seqpacket_pair(&pair, 4096) == 0 else {
            throw .init(description: "socketpair failed: \(Errno(rawValue: errno))")
        }
        let control = FileDescriptor(rawValue: pair[0])
        let pid: pid_t
        do { pid = try exec(pair[1]) } catch {
            close(pair[1])
            try? control.close()
            throw error
        }
        // Closed before waiting: a fork server that dies at start (its libraries missing) must
        // read as a closed channel at once, not as silence until the timeout.
        close(pair[1])
        let rawPidfd = cv_pidfd_open(pid)
        guard rawPidfd >= 0 else {
            let error = Errno(rawValue: errno)
            _ = Glibc.kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            try? control.close()
            throw .init(description: "pidfd_open(\(pid)) failed: \(error)")
        }
        _ = fcntl(rawPidfd, F_SETFD, FD_CLOEXEC)
        let server = ForkServerProcess(pid: pid, pidfd: FileDescriptor(rawValue: rawPidfd), control: control)
        do {
            guard case .ready(let readyPID, let version) = try server.receive(timeoutMs: Int32(clamping: timeoutMs)) else {
                throw WorkerSpawner.SpawnError(description: "it did not start with fork_server_ready")
            }
            guard readyPID == pid, version == ClipvisorVersion.workerProtocol else {
                throw WorkerSpawner.SpawnError(
                    description: "it says pid \(readyPID), protocol \(version); expected pid \(pid), protocol \(ClipvisorVersion.workerProtocol)")
            }
        } catch {
            let exit = server.stop()
            throw .init(description: "\(error)\(exit.map { " (it \($0))" } ?? "")")
        }
        return server
    }

    /// Asks for one worker whose control socket is `workerControl`; returns its pid, a child of
    /// this process.
    func fork(control workerControl: Int32) throws(WorkerSpawner.SpawnError) -> pid_t {
        let request = nextRequest
        nextRequest += 1
        let bytes = ForkServerMessage.fork(request: request).json.serialized()
        do {
            _ = try bytes.withBytes { raw throws(Errno) in
                try SocketIO.send(control, raw, passing: FileDescriptor(rawValue: workerControl))
            }
        } catch {
            throw .init(description: "sending the fork request: \(error)")
        }
        switch try receive(timeoutMs: Self.forkTimeoutMs) {
        case .forked(request, let pid):
            forks += 1
            return pid
        case .failed(request, let message):
            throw .init(description: message)
        case let other:
            throw .init(description: "answered \(other.json.jsonString) to fork request \(request)")
        }
    }

    private func receive(timeoutMs: Int32) throws(WorkerSpawner.SpawnError) -> ForkServerMessage {
        var buffer = [UInt8](repeating: 0, count: 4096)
        do {
            guard try SocketIO.waitReadable(control, timeoutMs: timeoutMs) else {
                throw WorkerSpawner.SpawnError(description: "no answer within \(timeoutMs) ms")
            }
            let received = try buffer.withMutableBytes { raw throws(Errno) in try SocketIO.receive(control, into: raw) }
            try? received.fd?.close()
            guard received.count > 0 else { throw WorkerSpawner.SpawnError(description: "it closed its channel") }
            return try ForkServerMessage(json: try JSONValue.parse(buffer[0..<received.count]))
        } catch let error as WorkerSpawner.SpawnError {
            throw error
        } catch {
            throw .init(description: "\(error)")
        }
    }

    /// SIGKILL, close, reap (waiting up to a second): safe to call once, in any state.
    /// Returns how it ended when it could be reaped.
    @discardableResult
    func stop() -> WorkerProcess.Exit? {
        _ = cv_pidfd_send_signal(pidfd.rawValue, SIGKILL)
        try? control.close()
        var exit: WorkerProcess.Exit?
        let until = Instant.now().adding(milliseconds: 1000)
        while exit == nil, Instant.now() < until {
            exit = WorkerProcess.reap(pidfd: pidfd)
            if exit == nil { usleep(2000) }
        }
        try? pidfd.close()
        return exit
    }
}
