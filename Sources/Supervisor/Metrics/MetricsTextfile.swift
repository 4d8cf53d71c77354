import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `--metrics-textfile PATH`: the metrics text written for node_exporter's textfile collector,
/// every `interval`, on a thread of its own (file I/O never runs on the event loop).
///
/// Each write goes to `PATH.PID.tmp` in the same directory, is fsynced, and is renamed over
/// `PATH`, so the collector (which reads `*.prom`) sees the old file or the new one, never half.
/// `stop` at exit waits for a write in progress, so no temp file is left behind.
final class MetricsTextfile: Sendable {
    let path: String
    /// True once stopped; held while a write is in progress.
    private let stopped = Mutex(false)

    private init(path: String) {
        self.path = path
    }

    /// Writes once now (so a bad path fails start-up with its reason), then keeps writing.
    static func start(path: String, intervalMs: Int, metrics: SupervisorMetrics, logger: Logger) throws(WriteFailure) -> MetricsTextfile {
        try write(metrics.text(), to: path)
        let writer = MetricsTextfile(path: path)
        Thread.detachNewThread {
            var failing = false
            while true {
                usleep(useconds_t(min(intervalMs, 3_600_000)) * 1000)
                let outcome = writer.stopped.withLock { stopped -> Result<Bool, WriteFailure>? in
                    if stopped { return nil }
                    return Result { () throws(WriteFailure) in try write(metrics.text(), to: path) }.map { true }
                }
                switch outcome {
                case nil:
                    return
                case .success:
                    if failing { logger.notice("metrics textfile \(path) written again") }
                    failing = false
                case .failure(let error):
                    // Once per failure streak: a full disk must not flood the log.
                    if !failing { logger.error("\(error)") }
                    failing = true
                }
            }
        }
        return writer
    }

    /// Stops writing: waits up to 2 s for a write in progress (a hung file system must not hold
    /// the exit), then removes a temp file that may be left.
    func stop() {
        let until = Instant.now().adding(milliseconds: 2000)
        while stopped.withLockIfAvailable({ $0 = true }) == nil, Instant.now() < until { usleep(10_000) }
        unlink(Self.temporaryPath(for: path))
    }

    static func temporaryPath(for path: String) -> String { "\(path).\(getpid()).tmp" }

    struct WriteFailure: Error, CustomStringConvertible {
        var description: String
    }

    /// Temp file, fsync, rename: atomic for readers of `path`.
    static func write(_ text: String, to path: String) throws(WriteFailure) {
        let temporary = temporaryPath(for: path)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw WriteFailure(description: "cannot write the metrics textfile \(temporary): \(String(cString: strerror(errno)))") }
        var bytes = Array(text.utf8)
        var offset = 0
        var failed: Int32 = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 {
                if errno == EINTR { continue }
                failed = errno
                break
            }
            offset += n
        }
        if failed == 0, fsync(fd) != 0 { failed = errno }
        close(fd)
        if failed == 0, rename(temporary, path) != 0 { failed = errno }
        if failed != 0 {
            unlink(temporary)
            throw WriteFailure(description: "cannot write the metrics textfile \(path): \(String(cString: strerror(failed)))")
        }
    }
}
