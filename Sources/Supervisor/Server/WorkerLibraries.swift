import CClipvisorShims
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Names the shared library a worker could not load, and the package that provides it.
///
/// A worker that exits 127 before it is ready was usually stopped by the dynamic loader: its
/// FFmpeg libraries are missing on this host, or of another major version (a wheel built
/// against FFmpeg 5, libavcodec.so.59, on a host with FFmpeg 6). That is a host problem, not a
/// clip's: it is reported as a start failure (`workers.last_start_error`, and `overloaded` with
/// `no_workers` to clients), in one line that says what to install. The supervisor itself never
/// loads FFmpeg, so it asks the loader, the way `ldd` does: it runs the worker executable with
/// `LD_TRACE_LOADED_OBJECTS=1`, which makes the loader resolve and list the libraries and exit
/// without running the program.
enum WorkerLibraries {
    /// How every explanation starts.
    static let prefix = "the decode worker cannot load "

    /// The one-line explanation, or nil when every library loads (the exit had another cause).
    static func diagnose(worker: String) -> String? {
        guard let output = traceLoader(worker) else { return nil }
        guard let (library, problem) = firstProblem(in: output) else { return nil }
        return "\(prefix)\(library) (\(problem)): install \(debianPackage(soname: library)) "
            + "(Debian/Ubuntu package; the worker was built against it), or a clipvisor build for this host's libraries"
    }

    /// The first library the loader could not load, and why, from its trace or error output.
    static func firstProblem(in output: String) -> (library: String, problem: String)? {
        for line in output.split(separator: "\n") {
            let text = line.trimming(" \t")
            // "libavcodec.so.59 => not found"
            if text.hasSuffix("=> not found"), let name = text.split(separator: " ").first {
                return (String(name), "not found on this host")
            }
            // "clipvisor-worker: error while loading shared libraries: libx.so.1: file too short"
            if let range = text.range(of: "error while loading shared libraries: ") {
                let rest = text[range.upperBound...]
                let parts = rest.split(separator: ":", maxSplits: 1)
                let reason = parts.count > 1 ? parts[1].trimming(" ") : "cannot be loaded"
                return (String(parts.first ?? rest), reason)
            }
        }
        return nil
    }

    /// Debian's name for the package of a shared library: `libavcodec.so.59` → `libavcodec59`,
    /// `libx265.so.199` → `libx265-199` (a name ending in a digit takes a dash), `_` → `-`.
    static func debianPackage(soname: String) -> String {
        guard let range = soname.range(of: ".so.") else { return soname }
        let base = soname[..<range.lowerBound].lowercased().replacingAll("_", with: "-")
        let major = soname[range.upperBound...].split(separator: ".").first.map(String.init) ?? ""
        guard !major.isEmpty else { return base }
        return (base.last?.isNumber == true ? "\(base)-" : base) + major
    }

    /// Runs the loader in trace mode on `worker` and returns its stdout and stderr (bounded to
    /// 64 KiB and 5 s), or nil when it cannot be run.
    private static func traceLoader(_ worker: String) -> String? {
        var fds: [Int32] = [-1, -1]
        guard cv_pipe_cloexec(&fds) == 0 else { return nil }
        let reader = fds[0]
        defer { close(reader) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 2)
        _ = withUnsafeMutablePointer(to: &actions) { cv_spawn_file_actions_addclosefrom($0, 3) }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        _ = withUnsafeMutablePointer(to: &attributes) { cv_spawnattr_reset_signals($0) }

        var environment = ["LD_TRACE_LOADED_OBJECTS=1"]
        if let path = getenv("LD_LIBRARY_PATH") { environment.append("LD_LIBRARY_PATH=\(String(cString: path))") }
        var cEnvironment: [UnsafeMutablePointer<CChar>?] = environment.map { strdup($0) } + [nil]
        var cArguments: [UnsafeMutablePointer<CChar>?] = [strdup(worker), nil]
        defer {
            for pointer in cEnvironment { free(pointer) }
            for pointer in cArguments { free(pointer) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, worker, &actions, &attributes, &cArguments, &cEnvironment)
        close(fds[1])
        guard rc == 0 else { return nil }

        var output: [UInt8] = []
        let until = Instant.now().adding(milliseconds: 5000)
        var chunk = [UInt8](repeating: 0, count: 4096)
        while output.count < 65536 {
            var poll = pollfd(fd: reader, events: Int16(POLLIN), revents: 0)
            let left = Int32(max(0, until.milliseconds(since: Instant.now())))
            guard left > 0, Glibc.poll(&poll, 1, left) > 0 else { break }
            let count = chunk.withUnsafeMutableBytes { read(reader, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { break }
            output += chunk[0..<count]
        }
        _ = kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0, errno == EINTR {}
        return String(decoding: output, as: UTF8.self)
    }
}

extension String {
    fileprivate func replacingAll(_ target: Character, with replacement: String) -> String {
        var out = ""
        for character in self { if character == target { out += replacement } else { out.append(character) } }
        return out
    }
}
