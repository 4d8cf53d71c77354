import ArgumentParser
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `clipvisor reload --pid N`: sends SIGHUP to a running supervisor (it reopens its skip log).
///
/// The unit's `ExecReload=` runs this instead of `/bin/kill -HUP $MAINPID`, because minimal
/// images (a Debian `minbase` root, distroless containers) have no `/bin/kill`: the service
/// reloads with what its package ships. It checks that the pid is a `clipvisor` process first,
/// so a stale pid never signals a stranger.
struct ReloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload",
        abstract: "Make a running supervisor reopen its skip log (SIGHUP), as logrotate needs.",
        discussion: """
            Used by clipvisor.service as `ExecReload=/usr/bin/clipvisor reload --pid $MAINPID` \
            (`systemctl reload clipvisor`). Exit status 1 when the process is not a clipvisor \
            supervisor or cannot be signalled.
            """)

    @Option(help: ArgumentHelp("The supervisor's process id (default: $MAINPID, which systemd sets for ExecReload=).", valueName: "pid"))
    var pid: Int32?

    func run() throws {
        guard let pid = pid ?? SocketDiscovery.environment("MAINPID").flatMap({ Int32($0) }), pid > 1 else {
            throw ValidationError("no supervisor pid: pass --pid (systemd: --pid $MAINPID)")
        }
        let name = Self.processName(pid)
        guard let name else {
            throw SupervisorClient.Failure("no process \(pid) (is the supervisor running?)")
        }
        guard name == "clipvisor" else {
            throw SupervisorClient.Failure("process \(pid) is \"\(name)\", not a clipvisor supervisor; not signalling it")
        }
        guard kill(pid, SIGHUP) == 0 else {
            throw SupervisorClient.Failure("cannot signal process \(pid): \(Errno(rawValue: errno))")
        }
    }

    /// The process's `comm` (`/proc/PID/comm`), or nil when there is no such process.
    static func processName(_ pid: Int32) -> String? {
        guard let fd = try? FileDescriptor.open("/proc/\(pid)/comm", .readOnly, options: .closeOnExec) else { return nil }
        defer { try? fd.close() }
        var buffer = [UInt8](repeating: 0, count: 64)
        guard let count = try? buffer.withUnsafeMutableBytes({ try fd.read(into: $0) }) else { return nil }
        return String(decoding: buffer[0..<count], as: UTF8.self).trimmingSuffix("\n")
    }
}

extension String {
    fileprivate func trimmingSuffix(_ suffix: String) -> String {
        hasSuffix(suffix) ? String(dropLast(suffix.count)) : self
    }
}
