import CClipvisorShims
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `clipvisor-worker serve --fork-server`: a worker already linked against FFmpeg that clones
/// new workers on request (Shared/ForkServerProtocol.swift says why). It decodes nothing and
/// applies no sandbox itself: each clone applies the full one, exactly as an exec'd worker does,
/// before it reads a job. It stays single-threaded, which is what makes the clone safe.
struct ForkServer {
    let config: WorkerServer.Configuration
    let faults: Faults

    /// Runs until the supervisor closes the channel; returns the exit code.
    func run() -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        let control = FileDescriptor(rawValue: config.controlFD)
        do { try Sandbox.bindToParent(config.parentPID) } catch {
            logLine("cannot start: \(error.description)")
            return WorkerMessage.ExitCode.sandbox.rawValue
        }
        guard send(.ready(pid: getpid(), protocolVersion: ClipvisorVersion.workerProtocol), on: control) else {
            return WorkerMessage.ExitCode.recycled.rawValue
        }
        var buffer = [UInt8](repeating: 0, count: 4096)
        var forks = 0
        while true {
            let received: SocketIO.Received
            do {
                received = try buffer.withMutableBytes { raw throws(Errno) in try SocketIO.receive(control, into: raw) }
            } catch {
                logLine("control socket: \(error)")
                return WorkerMessage.ExitCode.protocolError.rawValue
            }
            if received.count == 0 {
                try? received.fd?.close()
                return WorkerMessage.ExitCode.recycled.rawValue
            }
            let request: UInt64
            do {
                let message = try ForkServerMessage(json: try JSONValue.parse(buffer[0..<received.count]))
                guard case .fork(let number) = message, !received.truncated else {
                    throw WorkerProtocolError("fork server: expected a fork request, got \(message)")
                }
                request = number
            } catch {
                try? received.fd?.close()
                logLine("control socket: \(error)")
                return WorkerMessage.ExitCode.protocolError.rawValue
            }
            guard let workerControl = received.fd else {
                guard send(.failed(request: request, message: "no control socket came with the request"), on: control) else {
                    return WorkerMessage.ExitCode.protocolError.rawValue
                }
                continue
            }
            forks += 1
            if faults.forkServerStallAt == forks {
                logLine("not answering fork request \(request) (test fault fork-server-stall-at)")
                while true { pause() }
            }
            if faults.forkServerLieAt == forks {
                try? workerControl.close()
                guard send(.forked(request: request + 1000, pid: 1), on: control) else {
                    return WorkerMessage.ExitCode.protocolError.rawValue
                }
                continue
            }
            let reply = fork(request: request, workerControl: workerControl)
            try? workerControl.close()
            guard send(reply, on: control) else { return WorkerMessage.ExitCode.protocolError.rawValue }
        }
    }

    /// Clones one worker. The child never returns from here: it becomes a worker and exits with
    /// the worker's code, on the stack it inherited.
    private func fork(request: UInt64, workerControl: FileDescriptor) -> ForkServerMessage {
        let pid = cv_clone_sibling()
        if pid < 0 {
            return .failed(request: request, message: "clone(CLONE_PARENT): \(Errno(rawValue: errno))")
        }
        guard pid == 0 else { return .forked(request: request, pid: pid) }
        guard cv_become_worker(workerControl.rawValue) == 0 else {
            logLine("new worker: cannot set up its control socket: \(Errno(rawValue: errno))")
            _exit(WorkerMessage.ExitCode.sandbox.rawValue)
        }
        var workerConfig = config
        workerConfig.controlFD = 3
        let server = WorkerServer(workerConfig, faults: faults)
        // The sandbox first, while this is the only thread: every thread started later inherits
        // it (seccomp, no_new_privs and Landlock are per thread).
        guard let landlock = server.enterSandbox() else { _exit(WorkerMessage.ExitCode.sandbox.rawValue) }
        // Then the worker serves from a thread of its own. This thread is a raw clone of the
        // fork server's and keeps thread ids cached from it: the Swift runtime's locks
        // (`ulock_get_tid`) and glibc's own bookkeeping. A lock this thread held would carry the
        // fork server's id, and a second thread waiting for it (FUTEX_LOCK_PI) then spun, as did
        // this thread's unlock, both at 100 % CPU until the deadline: the reader threads of a
        // clip did so on type metadata (docs/benchmarks.md, fifth session; `contend-on` shows it).
        // A thread started here caches its own id; this one only waits for it.
        let code = runOnFreshThread { server.serve(landlock: landlock) }
        _exit(code)
    }

    /// Runs `body` on a thread started now, waits for it and returns its result; the exit code
    /// `ExitCode.sandbox` (logged) when no thread can be started.
    private func runOnFreshThread(_ body: @escaping () -> Int32) -> Int32 {
        final class Call {
            let body: () -> Int32
            var result: Int32 = 0
            init(_ body: @escaping () -> Int32) { self.body = body }
        }
        let call = Call(body)
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        var started = pthread_attr_setstacksize(&attributes, Self.workerStackBytes)
        var thread = pthread_t()
        if started == 0 {
            started = pthread_create(&thread, &attributes, { raw in
                let call = Unmanaged<Call>.fromOpaque(raw!).takeUnretainedValue()
                call.result = call.body()
                return nil
            }, Unmanaged.passUnretained(call).toOpaque())
        }
        guard started == 0 else {
            logLine("new worker: cannot start its thread: \(Errno(rawValue: started))")
            return WorkerMessage.ExitCode.sandbox.rawValue
        }
        pthread_join(thread, nil)
        return withExtendedLifetime(call) { call.result }
    }

    /// The serving thread's stack: what a main thread gets under the usual 8 MiB RLIMIT_STACK.
    static let workerStackBytes = 8 << 20

    private func send(_ message: ForkServerMessage, on control: FileDescriptor) -> Bool {
        let bytes = message.json.serialized()
        do throws(Errno) {
            let sent = try bytes.withBytes { raw throws(Errno) in try SocketIO.send(control, raw) }
            return sent == bytes.count
        } catch {
            // The supervisor went away: nothing to say to anyone.
            if error != .brokenPipe && error != .connectionReset { logLine("control socket: \(error)") }
            return false
        }
    }

    private func logLine(_ text: String) {
        let line = Array("clipvisor-worker[\(getpid())] fork server: \(text)\n".utf8)
        _ = try? line.withUnsafeBytes { try FileDescriptor.standardError.writeAll($0) }
    }
}
