import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// One client connection: framed input with the fds that came with it, and an output queue
/// whose messages may carry a block's memfd. Owns its fd and every fd it holds.
final class Connection {
    struct Peer {
        var pid: pid_t
        var uid: uid_t
        var gid: gid_t
    }

    /// A framed message waiting to be written; `fd` goes with its first byte and is closed once sent.
    struct Outgoing {
        var bytes: [UInt8]
        var sent = 0
        var fd: FileDescriptor?
        /// Block bytes this message keeps alive in the supervisor (for the memory budget).
        var blockBytes: Int
    }

    /// What the client asked for and has not been fully answered yet.
    enum Pending {
        case single(JobID)
        case sample(SampleState)
    }

    let id: UInt64
    let fd: FileDescriptor
    let peer: Peer
    var inbox = MessageBuffer()
    /// The fd that arrived with the message being read (reads never cross a message's end, so
    /// an fd belongs to the message its bytes arrived in). Claimed by a clip declaring
    /// `"fd": true`; closed once that message is handled if nothing claimed it.
    var messageFD: FileDescriptor?
    var outbox: [Outgoing] = []
    var wantsWritable = false
    /// Input is not watched while the client leaves too many answers unread (see
    /// `Supervisor.flush`): a client that only writes cannot grow the outbox without bound.
    var readingPaused = false
    var greeted = false
    /// Block slabs granted in the hello (docs/protocol.md, "Block slabs"); 0: none.
    var slabsGranted = 0
    /// Close once the outbox is flushed (after a fatal protocol error).
    var closeAfterFlush = false
    var pending: [Int: Pending] = [:]

    init(id: UInt64, fd: FileDescriptor, peer: Peer) {
        self.id = id
        self.fd = fd
        self.peer = peer
    }

    var outboxBlockBytes: Int { outbox.reduce(0) { $0 + $1.blockBytes } }

    /// Bytes written to the socket so far.
    private var bytesWritten = 0
    /// Blocks written to the socket that the client may not have read yet, by the stream offset
    /// where their message ends. Their memfds live on in the socket's queue (and count as fds
    /// in flight for the service user), so they stay on the memory budget until read past.
    private var unreadBlocks: [(end: Int, bytes: Int)] = []
    private(set) var unreadBlockBytes = 0
    var unreadBlockCount: Int { unreadBlocks.count }

    /// Releases the blocks the client has read past.
    func settleUnreadBlocks() {
        guard !unreadBlocks.isEmpty else { return }
        // The queue length over-estimates what is left unread, so blocks are released late,
        // never early; an empty queue releases all.
        let consumed = bytesWritten - (SocketIO.unreadOutputBytes(fd) ?? 0)
        var read = 0
        while read < unreadBlocks.count, unreadBlocks[read].end <= consumed {
            unreadBlockBytes -= unreadBlocks[read].bytes
            read += 1
        }
        if read > 0 { unreadBlocks.removeFirst(read) }
    }

    func enqueue(_ message: JSONValue, fd: FileDescriptor? = nil, blockBytes: Int = 0) {
        outbox.append(Outgoing(bytes: MessageFraming.frame(message), fd: fd, blockBytes: blockBytes))
    }

    /// Writes as much of the outbox as the socket takes. Returns false when the peer is gone.
    func flush() -> Bool {
        while !outbox.isEmpty {
            var message = outbox[0]
            let attach = message.sent == 0 ? message.fd : nil
            let result = message.bytes.withUnsafeBytes { raw in
                Result { () throws(Errno) in
                    try SocketIO.send(fd, UnsafeRawBufferPointer(rebasing: raw[message.sent...]), passing: attach, nonBlocking: true)
                }
            }
            switch result {
            case .success(let n):
                message.sent += n
                bytesWritten += n
                if let attached = attach {
                    try? attached.close()
                    message.fd = nil
                }
                if message.sent == message.bytes.count {
                    if message.blockBytes > 0 {
                        unreadBlocks.append((end: bytesWritten, bytes: message.blockBytes))
                        unreadBlockBytes += message.blockBytes
                    }
                    outbox.removeFirst()
                } else {
                    outbox[0] = message
                }
            case .failure(let error):
                if error == .wouldBlock || error == .resourceTemporarilyUnavailable { return true }
                return false
            }
        }
        return true
    }

    /// Releases every fd this connection holds. Called once, when it is dropped.
    func closeAll() {
        for message in outbox { try? message.fd?.close() }
        outbox.removeAll()
        try? messageFD?.close()
        messageFD = nil
        try? fd.close()
    }
}
