import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A blocking client of the supervisor, for the `clipvisor` CLI: one connection, requests
/// answered by id, every wait bounded.
final class SupervisorClient {
    struct Failure: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    let fd: FileDescriptor
    let socketPath: String
    private var inbox = MessageBuffer()
    private var receivedFDs: [FileDescriptor] = []
    private var nextID = 1
    /// What the server said in `hello`.
    private(set) var hello: JSONValue = .null

    private init(fd: FileDescriptor, socketPath: String) {
        self.fd = fd
        self.socketPath = socketPath
    }

    deinit {
        for received in receivedFDs { try? received.close() }
        try? fd.close()
    }

    /// Connects to the first candidate socket that accepts and answers `hello` within
    /// `timeoutMs`. Throws with every attempt's error when none does. `slabs`: block slabs to
    /// ask for (docs/protocol.md); the CLI reads each block once and asks for none.
    static func connect(candidates: [String], timeoutMs: Int32 = 5000, slabs: Int = 0) throws(Failure) -> SupervisorClient {
        var problems: [String] = []
        for path in candidates {
            let fd: FileDescriptor
            do {
                fd = try UnixSocket.connect(to: path)
            } catch {
                problems.append(SocketDiscovery.permissionProblem(path) ?? "\(path): \(error)")
                continue
            }
            let client = SupervisorClient(fd: fd, socketPath: path)
            do {
                var hello: JSONValue = [
                    "op": "hello", "protocol": .number(Double(ClipvisorVersion.clientProtocol)),
                    "client": .string("clipvisor-cli/\(ClipvisorVersion.string)"), "pid": .number(Double(getpid())),
                ]
                if slabs > 0 { hello = hello.merging(["slabs": .number(Double(slabs))]) }
                try client.send(hello)
                let (answer, _) = try client.receive(timeoutMs: timeoutMs)
                guard answer["ok"]?.boolValue == true else {
                    throw Failure(answer["error"]?["message"]?.stringValue ?? "hello refused")
                }
                client.hello = answer
                return client
            } catch {
                problems.append("\(path): \(error)")
            }
        }
        throw Failure("no clipvisor supervisor answers (\(problems.joined(separator: "; ")))")
    }

    func makeID() -> Int {
        defer { nextID += 1 }
        return nextID
    }

    func send(_ message: JSONValue, passing clipFD: FileDescriptor? = nil) throws(Failure) {
        do {
            try SocketIO.sendAll(fd, MessageFraming.frame(message), passing: clipFD)
        } catch {
            throw Failure("sending to \(socketPath) failed: \(error)")
        }
    }

    /// The next message, with the fd it carries when it declares one (`block_bytes`, unless its
    /// block is in a slab whose fd came earlier).
    func receive(timeoutMs: Int32) throws(Failure) -> (JSONValue, FileDescriptor?) {
        let deadline = Instant.now().adding(milliseconds: Int(timeoutMs))
        var buffer = [UInt8](repeating: 0, count: 65_536)
        while true {
            let body: [UInt8]?
            do {
                body = try inbox.next()
            } catch {
                throw Failure("the supervisor sent a malformed frame: \(error)")
            }
            if let body {
                guard let message = try? JSONValue.parse(body) else { throw Failure("the supervisor sent malformed JSON") }
                var attached: FileDescriptor?
                let carriesFD = message["block_bytes"] != nil && message["slab"]?["attached"]?.boolValue != false
                if carriesFD, !receivedFDs.isEmpty { attached = receivedFDs.removeFirst() }
                return (message, attached)
            }
            let left = Int32(deadline.milliseconds(since: Instant.now()))
            do {
                guard try SocketIO.waitReadable(fd, timeoutMs: left) else {
                    throw Failure("no answer from the supervisor at \(socketPath) within \(timeoutMs) ms")
                }
                let received = try buffer.withMutableBytes { raw throws(Errno) in try SocketIO.receive(fd, into: raw) }
                if let attached = received.fd { receivedFDs.append(attached) }
                guard received.count > 0 else { throw Failure("the supervisor at \(socketPath) closed the connection") }
                buffer.withUnsafeBytes { inbox.append(UnsafeRawBufferPointer(rebasing: $0[0..<received.count])) }
            } catch let failure as Failure {
                throw failure
            } catch {
                throw Failure("reading from \(socketPath) failed: \(error)")
            }
        }
    }

    /// Sends one request and waits for its answer (the first message with its id).
    func call(_ fields: [String: JSONValue], passing clipFD: FileDescriptor? = nil, timeoutMs: Int32) throws(Failure) -> (JSONValue, FileDescriptor?) {
        let id = makeID()
        var message = fields
        message["id"] = .number(Double(id))
        try send(.object(message), passing: clipFD)
        while true {
            let (answer, attached) = try receive(timeoutMs: timeoutMs)
            if answer["id"]?.intValue == id { return (answer, attached) }
            try? attached?.close()
        }
    }
}
