import CClipvisorShims
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The supervisor's side of the fork server (Shared/ForkServerProtocol.swift).
///
/// The event loop must never wait long on it. Its start is asynchronous: it is exec'd, its
/// channel is watched, and it is used once its `fork_server_ready` has been read (until then
/// workers are exec'd; only the supervisor's very first spawn waits for it, briefly). A fork
/// request is synchronous but bounded by `forkTimeoutMs`: a clone takes well under a millisecond,
/// so a fork server that is slower than that, answers out of turn or dies is stopped, and the
/// spawner execs workers (WorkerSpawner says so in the log).
final class ForkServerProcess {
    enum State: Equatable {
        /// Exec'd; `fork_server_ready` expected before `deadline`.
        case starting(deadline: Instant)
        case ready
    }

    let pid: pid_t
    let pidfd: FileDescriptor
    /// The channel; watched by the event loop while the fork server starts.
    let control: FileDescriptor
    private(set) var state: State
    private var nextRequest: UInt64 = 1
    private(set) var forks = 0
    /// How long a fork may take before the fork server is given up. A clone takes well under a
    /// millisecond even on a loaded machine; this bounds how long a stuck fork server can hold
    /// the event loop, once (then workers are exec'd for 30 s).
    static let forkTimeoutMs: Int32 = 250

    private init(pid: pid_t, pidfd: FileDescriptor, control: FileDescriptor, startDeadline: Instant) {
        self.pid = pid
        self.pidfd = pidfd
        self.control = control
        self.state = .starting(deadline: startDeadline)
    }

    /// Execs the fork server through `exec` (given the child's end of its channel); it is ready
    /// once `readReady` has read its `fork_server_ready`.
    static func launch(
        startTimeoutMs: Int, exec: (Int32) throws(WorkerSpawner.SpawnError) -> pid_t
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
        // Closed at once: a fork server that dies at start (its libraries missing) must read as
        // a closed channel, not as silence until the deadline.
        close(pair[1])
        _ = fcntl(control.rawValue, F_SETFL, fcntl(control.rawValue, F_GETFL) | O_NONBLOCK)
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
        return ForkServerProcess(
            pid: pid, pidfd: FileDescriptor(rawValue: rawPidfd), control: control,
            startDeadline: Instant.now().adding(milliseconds: startTimeoutMs))
    }

    /// Reads what the fork server said while starting. Returns true once it is ready; throws
    /// when it said something else, closed its channel, or missed its start deadline.
    /// `waitMs` > 0 waits that long for the message (the supervisor's first spawn only).
    func readReady(now: Instant, waitMs: Int32 = 0) throws(WorkerSpawner.SpawnError) -> Bool {
        guard case .starting(let deadline) = state else { return true }
        if waitMs > 0 { _ = try? SocketIO.waitReadable(control, timeoutMs: waitMs) }
        guard let message = try receive() else {
            if deadline <= now {
                throw .init(description: "it did not say fork_server_ready within the start timeout")
            }
            return false
        }
        guard case .ready(let readyPID, let version) = message else {
            throw .init(description: "it started with \(message.json.jsonString), not fork_server_ready")
        }
        guard readyPID == pid, version == ClipvisorVersion.workerProtocol else {
            throw .init(
                description: "it says pid \(readyPID), protocol \(version); expected pid \(pid), protocol \(ClipvisorVersion.workerProtocol)")
        }
        state = .ready
        return true
    }

    /// Asks for one worker whose control socket is `workerControl`; returns its pid, a child of
    /// this process. Only once ready.
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
        let answered: Bool
        do { answered = try SocketIO.waitReadable(control, timeoutMs: Self.forkTimeoutMs) } catch {
            throw .init(description: "waiting for its answer: \(error)")
        }
        guard answered, let message = try receive() else {
            throw .init(description: "no answer to fork request \(request) within \(Self.forkTimeoutMs) ms")
        }
        switch message {
        case .forked(request, let pid):
            forks += 1
            return pid
        case .failed(request, let message):
            throw .init(description: message)
        case let other:
            throw .init(description: "answered \(other.json.jsonString) to fork request \(request)")
        }
    }

    /// Called when its channel is readable outside a fork request, once ready: nothing should
    /// come then. Throws when something did, or the channel closed.
    func checkQuiet() throws(WorkerSpawner.SpawnError) {
        if let message = try receive() {
            throw .init(description: "it said \(message.json.jsonString) unasked")
        }
    }

    /// One message if one is waiting (nil: none yet). A closed channel or a message this side
    /// cannot read is an error.
    private func receive() throws(WorkerSpawner.SpawnError) -> ForkServerMessage? {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let received: SocketIO.Received
        do {
            received = try buffer.withMutableBytes { raw throws(Errno) in try SocketIO.receive(control, into: raw, nonBlocking: true) }
        } catch {
            if error == .wouldBlock || error == .resourceTemporarilyUnavailable { return nil }
            throw .init(description: "its channel: \(error)")
        }
        try? received.fd?.close()
        guard received.count > 0 else { throw .init(description: "it closed its channel") }
        do {
            return try ForkServerMessage(json: try JSONValue.parse(buffer[0..<received.count]))
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
