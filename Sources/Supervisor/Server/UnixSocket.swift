import CClipvisorShims
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Unix-domain socket set-up. sockaddr_un's path is a fixed C array; these helpers fill it
/// and fail clearly when a path is too long for it (108 bytes with the NUL).
enum UnixSocket {
    struct PathTooLong: Error, CustomStringConvertible {
        var path: String
        var description: String { "socket path is longer than 107 bytes: \(path)" }
    }

    static func address(_ path: String) throws(PathTooLong) -> (sockaddr_un, socklen_t) {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { throw PathTooLong(path: path) }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let length = MemoryLayout<sa_family_t>.size + bytes.count + 1
        return (address, socklen_t(length))
    }

    /// A new socket; `nonBlocking` for the event loop, blocking for CLI clients.
    static func makeStreamSocket(nonBlocking: Bool) throws(Errno) -> FileDescriptor {
        let fd = cv_unix_stream_socket(nonBlocking ? 1 : 0)
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        return FileDescriptor(rawValue: fd)
    }

    /// Connects a blocking socket to `path`.
    static func connect(to path: String) throws -> FileDescriptor {
        let (address, length) = try UnixSocket.address(path)
        let fd = try makeStreamSocket(nonBlocking: false)
        var copy = address
        let rc = withUnsafePointer(to: &copy) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd.rawValue, $0, length) }
        }
        if rc != 0 {
            let error = Errno(rawValue: errno)
            try? fd.close()
            throw error
        }
        return fd
    }

    /// Binds and listens on `path` with the given mode. The socket is non-blocking.
    static func listen(at path: String, mode: mode_t) throws -> FileDescriptor {
        let (address, length) = try UnixSocket.address(path)
        let fd = try makeStreamSocket(nonBlocking: true)
        var copy = address
        // The socket file gets its mode at bind time; the umask keeps it from ever being wider.
        let previous = umask(0o777 & ~mode)
        let rc = withUnsafePointer(to: &copy) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd.rawValue, $0, length) }
        }
        let bindError = errno
        umask(previous)
        guard rc == 0 else {
            try? fd.close()
            throw Errno(rawValue: bindError)
        }
        chmod(path, mode)
        guard Glibc.listen(fd.rawValue, 512) == 0 else {
            let error = Errno(rawValue: errno)
            try? fd.close()
            throw error
        }
        return fd
    }

    /// Makes an existing fd non-blocking and close-on-exec (a socket passed by systemd).
    static func prepareInherited(_ fd: FileDescriptor) {
        let flags = fcntl(fd.rawValue, F_GETFL)
        _ = fcntl(fd.rawValue, F_SETFL, flags | O_NONBLOCK)
        _ = fcntl(fd.rawValue, F_SETFD, FD_CLOEXEC)
    }
}
