import Shared

/// Monotonic counters for `status` and metrics.
struct Counters {
    var decoded = 0
    var probed = 0
    var skipped: [SkipReason: Int] = [:]
    var timeouts = 0
    var crashes = 0
    /// Crashes of workers that had refused bad media earlier: their clip was tried again on a
    /// fresh worker instead of being blamed at once.
    var crashRetries = 0
    var recycles = 0
    var spawns = 0
    var spawnFailures = 0
    var bytesOut = 0
    var requests = 0
    var connections = 0
    var protocolErrors = 0

    var json: JSONValue {
        var skippedJSON: [String: JSONValue] = [:]
        for reason in SkipReason.allCases { skippedJSON[reason.rawValue] = .number(Double(skipped[reason, default: 0])) }
        return [
            "decoded": .number(Double(decoded)), "probed": .number(Double(probed)),
            "skipped": .object(skippedJSON), "timeouts": .number(Double(timeouts)),
            "crashes": .number(Double(crashes)), "crash_retries": .number(Double(crashRetries)), "recycles": .number(Double(recycles)),
            "spawns": .number(Double(spawns)), "spawn_failures": .number(Double(spawnFailures)),
            "bytes_out": .number(Double(bytesOut)), "requests": .number(Double(requests)),
            "connections": .number(Double(connections)), "protocol_errors": .number(Double(protocolErrors)),
        ]
    }
}
