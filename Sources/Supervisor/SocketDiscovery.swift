#if canImport(Glibc)
import Glibc
#endif

/// Where a supervisor listens and where clients look for one (docs/protocol.md).
enum SocketDiscovery {
    static let systemSocket = "/run/clipvisor/clipvisor.sock"

    static func environment(_ key: String) -> String? {
        guard let value = getenv(key) else { return nil }
        let string = String(cString: value)
        return string.isEmpty ? nil : string
    }

    /// `$XDG_RUNTIME_DIR/clipvisor/clipvisor.sock`, else `/tmp/clipvisor-$UID/clipvisor.sock`.
    static var perUserSocket: String {
        if let runtime = environment("XDG_RUNTIME_DIR") { return "\(runtime)/clipvisor/clipvisor.sock" }
        return "/tmp/clipvisor-\(getuid())/clipvisor.sock"
    }

    /// The path `clipvisor serve` listens on when `--socket` is not given.
    static var serverDefault: String {
        if let explicit = environment("CLIPVISOR_SOCKET") { return explicit }
        if let runtime = environment("RUNTIME_DIRECTORY") {
            // systemd may list several directories separated by ':'; the first is ours.
            let first = runtime.split(separator: ":").first.map(String.init) ?? runtime
            return "\(first)/clipvisor.sock"
        }
        return perUserSocket
    }

    /// Why a socket that exists refuses this user, or nil: the system service's socket is 0660
    /// root:clipvisor, and a user outside the group must be told so rather than handed a private
    /// supervisor that bypasses the service's roots, quarantine and skip log.
    static func permissionProblem(_ path: String) -> String? {
        var info = stat()
        guard stat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFSOCK, access(path, W_OK) != 0, errno == EACCES else {
            return nil
        }
        let group = getgrgid(info.st_gid).map { String(cString: $0.pointee.gr_name) } ?? "\(info.st_gid)"
        return "permission denied on \(path): join group \(group) (sudo usermod -aG \(group) $USER, then log in again)"
    }

    /// Whether the user chose a private supervisor over a system service that refuses them
    /// (`$CLIPVISOR_PRIVATE` set to anything but `0`; the CLI's `--private`).
    static var privateFallbackChosen: Bool {
        guard let value = environment("CLIPVISOR_PRIVATE") else { return false }
        return value != "0"
    }

    /// Candidate sockets for a client, in the order they are tried.
    static var clientCandidates: [String] {
        var list: [String] = []
        if let explicit = environment("CLIPVISOR_SOCKET") { list.append(explicit) }
        list.append(systemSocket)
        list.append(perUserSocket)
        return list
    }
}
