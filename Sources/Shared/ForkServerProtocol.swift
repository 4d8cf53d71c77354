/// Supervisor ↔ fork server (`clipvisor-worker serve --fork-server`, docs/worker-protocol.md,
/// "The fork server"). Starting a worker with exec costs ~25 ms of CPU, almost all of it the
/// dynamic linking of FFmpeg's ~135 libraries; after a crash or a failed clip the replacement
/// pays it again. The fork server is one worker process, linked once, that clones a new worker
/// on request in well under a millisecond. The clone's parent is the supervisor (CLONE_PARENT),
/// so the supervisor reaps, signals and kills it through a pidfd exactly as a worker it exec'd.
///
/// One JSON object per SOCK_SEQPACKET datagram, like the worker channel. A `fork` carries the
/// worker's end of a new control socket as SCM_RIGHTS; the new worker then speaks the worker
/// protocol on it (`ready` first), and the fork server keeps nothing of it.
public enum ForkServerMessage: Sendable, Equatable {
    /// Fork server → supervisor, once at start: it is linked and listening.
    case ready(pid: Int32, protocolVersion: Int)
    /// Supervisor → fork server, with the new worker's control socket attached.
    case fork(request: UInt64)
    /// Fork server → supervisor: the new worker's pid (a child of the supervisor).
    case forked(request: UInt64, pid: Int32)
    /// Fork server → supervisor: no worker was made (clone refused, or no socket came).
    case failed(request: UInt64, message: String)

    public var json: JSONValue {
        switch self {
        case .ready(let pid, let version):
            ["op": "fork_server_ready", "pid": .number(Double(pid)), "protocol": .number(Double(version))]
        case .fork(let request):
            ["op": "fork", "request": .number(Double(request))]
        case .forked(let request, let pid):
            ["op": "forked", "request": .number(Double(request)), "pid": .number(Double(pid))]
        case .failed(let request, let message):
            ["op": "fork_failed", "request": .number(Double(request)), "message": .string(message)]
        }
    }

    /// Reads a message from the other side; a shape this file does not give is a protocol error
    /// (the supervisor then stops using the fork server, the fork server exits 76).
    public init(json: JSONValue) throws(WorkerProtocolError) {
        func number<T: FixedWidthInteger>(_ key: String, as: T.Type) throws(WorkerProtocolError) -> T {
            guard let value = json[key]?.intValue.flatMap(T.init(exactly:)) else {
                throw WorkerProtocolError("fork server: a \(json["op"]?.stringValue ?? "message") without a valid \(key)")
            }
            return value
        }
        switch json["op"]?.stringValue {
        case "fork_server_ready":
            self = .ready(pid: try number("pid", as: Int32.self), protocolVersion: try number("protocol", as: Int.self))
        case "fork":
            self = .fork(request: try number("request", as: UInt64.self))
        case "forked":
            let pid = try number("pid", as: Int32.self)
            guard pid > 0 else { throw WorkerProtocolError("fork server: forked pid \(pid)") }
            self = .forked(request: try number("request", as: UInt64.self), pid: pid)
        case "fork_failed":
            self = .failed(
                request: try number("request", as: UInt64.self),
                message: String((json["message"]?.stringValue ?? "no reason given").prefix(500)))
        default:
            throw WorkerProtocolError("fork server: an unknown message \(json["op"]?.jsonString ?? "without op")")
        }
    }
}
