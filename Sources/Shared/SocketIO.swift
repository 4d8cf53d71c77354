import CClipvisorShims
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Sending and receiving bytes with at most one fd attached (SCM_RIGHTS), for both the worker's
/// SOCK_SEQPACKET control socket and the clients' stream socket.
public enum SocketIO {
    /// Sends `bytes` with `fd` attached to its first byte. Retries EINTR; never raises SIGPIPE.
    /// Returns the number of bytes the kernel took (a stream socket may take fewer).
    public static func send(
        _ socket: FileDescriptor, _ bytes: UnsafeRawBufferPointer, passing fd: FileDescriptor? = nil,
        nonBlocking: Bool = false
    ) throws(Errno) -> Int {
        while true {
            let n = cv_send_with_fd(
                socket.rawValue, bytes.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, bytes.count,
                fd?.rawValue ?? -1, nonBlocking ? Int32(MSG_DONTWAIT) : 0)
            if n >= 0 { return n }
            let error = Errno(rawValue: errno)
            if error != .interrupted { throw error }
        }
    }

    /// Bytes written to a Unix stream socket that the peer has not read yet (an over-estimate:
    /// the kernel counts its buffer overhead too); nil when the socket cannot tell.
    public static func unreadOutputBytes(_ socket: FileDescriptor) -> Int? {
        let queued = cv_unread_output_bytes(socket.rawValue)
        return queued >= 0 ? Int(queued) : nil
    }

    /// SO_SNDBUF of `socket`: on a SOCK_SEQPACKET socket, about the largest datagram it sends.
    public static func sendBufferBytes(_ socket: FileDescriptor) -> Int {
        Int(cv_send_buffer_bytes(socket.rawValue))
    }

    /// Sends a whole message on a blocking socket; the fd goes with the first chunk.
    public static func sendAll(_ socket: FileDescriptor, _ bytes: [UInt8], passing fd: FileDescriptor? = nil) throws(Errno) {
        try bytes.withBytes { raw throws(Errno) in
            var sent = try send(socket, raw, passing: fd)
            while sent < raw.count {
                sent += try send(socket, UnsafeRawBufferPointer(rebasing: raw[sent...]))
            }
        }
    }

    /// One `recvmsg`: the bytes read (0 at end of stream) and a received fd, owned by the caller.
    /// `truncated` reports a datagram cut short or extra fds (closed on arrival).
    public struct Received {
        public var count: Int
        public var fd: FileDescriptor?
        public var truncated: Bool
    }

    public static func receive(
        _ socket: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer, nonBlocking: Bool = false
    ) throws(Errno) -> Received {
        while true {
            var fd: Int32 = -1
            var truncated: Int32 = 0
            let n = cv_recv_with_fd(
                socket.rawValue, buffer.baseAddress!, buffer.count, &fd, &truncated,
                nonBlocking ? Int32(MSG_DONTWAIT) : 0)
            if n >= 0 {
                return Received(count: n, fd: fd >= 0 ? FileDescriptor(rawValue: fd) : nil, truncated: truncated != 0)
            }
            let error = Errno(rawValue: errno)
            if error != .interrupted { throw error }
        }
    }

    /// Waits until `fd` is readable or `timeoutMs` passes (−1: forever); false on timeout.
    public static func waitReadable(_ fd: FileDescriptor, timeoutMs: Int32) throws(Errno) -> Bool {
        var entry = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
        while true {
            let n = poll(&entry, 1, timeoutMs)
            if n >= 0 { return n > 0 }
            let error = Errno(rawValue: errno)
            if error != .interrupted { throw error }
        }
    }
}
