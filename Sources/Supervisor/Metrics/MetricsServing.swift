import Logging
import Shared

/// Starts what `serve` was configured to do with its metrics: the HTTP listener and the
/// textfile writer. Both read `supervisor.metrics` from threads of their own.
enum MetricsServing {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// What runs, for `stop` at exit.
    struct Running {
        var textfile: MetricsTextfile?

        func stop() { textfile?.stop() }
    }

    static func start(_ settings: ServeSettings, supervisor: Supervisor, logger: Logger) throws(Failure) -> Running {
        var running = Running()
        if let address = settings.metricsListen {
            let bound: MetricsAddress
            do {
                bound = try MetricsListener.start(address, metrics: supervisor.metrics, logger: logger)
            } catch {
                throw Failure(description: error.description)
            }
            if !bound.isLoopback {
                logger.warning("metrics listener on \(bound) is reachable from other machines: restrict it with a firewall")
            }
            logger.info("metrics on http://\(bound)/metrics", metadata: ["metrics.listen": "\(bound)"])
            supervisor.metricsEndpoints["listen"] = .string(bound.description)
        }
        if let path = settings.metricsTextfile {
            do {
                running.textfile = try MetricsTextfile.start(
                    path: path, intervalMs: settings.metricsIntervalMs, metrics: supervisor.metrics, logger: logger)
            } catch {
                throw Failure(description: error.description)
            }
            supervisor.metricsEndpoints["textfile"] = .string(path)
        }
        return running
    }
}
