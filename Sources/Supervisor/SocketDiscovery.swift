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

    /// Candidate sockets for a client, in the order they are tried.
    static var clientCandidates: [String] {
        var list: [String] = []
        if let explicit = environment("CLIPVISOR_SOCKET") { list.append(explicit) }
        list.append(systemSocket)
        list.append(perUserSocket)
        return list
    }
}
