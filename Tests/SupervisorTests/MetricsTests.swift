import Foundation
import Shared
import Testing

@testable import Supervisor

/// The metrics' parts that need no running supervisor: the listen address, the config keys, the
/// text the registry emits, /proc reading and `clipvisor top`'s rendering. The end-to-end checks
/// (a real supervisor scraped over HTTP) are in clients/python/tests/test_metrics.py.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct MetricsTests {
    @Test func listenAddressesAreIPLiteralsAndPortsDefaultToLoopback() throws {
        #expect(try MetricsAddress.parse("127.0.0.1:9464").get() == MetricsAddress(host: "127.0.0.1", port: 9464, isIPv6: false))
        #expect(try MetricsAddress.parse("9464").get().host == "127.0.0.1")
        #expect(try MetricsAddress.parse(":9464").get().host == "127.0.0.1")
        #expect(try MetricsAddress.parse("localhost:0").get().description == "127.0.0.1:0")
        let v6 = try MetricsAddress.parse("[::1]:9464").get()
        #expect(v6.isIPv6 && v6.isLoopback && v6.description == "[::1]:9464")
        #expect(try !MetricsAddress.parse("0.0.0.0:9464").get().isLoopback)
        for bad in ["example.com:9464", "127.0.0.1:http", "127.0.0.1:70000", "[::1]9464", "::1:9464", "10.0.0.300:1"] {
            guard case .failure(let error) = MetricsAddress.parse(bad) else {
                Issue.record("\(bad) was accepted")
                continue
            }
            #expect(error.description.contains(bad) || error.description.contains("not an IP address"), "\(bad): \(error)")
        }
    }

    @Test func configKeysTakeOffAndRefuseBadValuesByName() throws {
        let directory = TemporaryDirectory("metrics-config")
        let path = directory.file("c.toml")
        try "metrics_listen = \"off\"\nmetrics_textfile = \"off\"\nmetrics_interval = 2\n".write(toFile: path, atomically: true, encoding: .utf8)
        let settings = try ServeSettings.resolve(file: try ConfigFile.load(path), flags: [:])
        #expect(settings.metricsListen == nil && settings.metricsTextfile == nil && settings.metricsIntervalMs == 2000)
        let flagged = try ServeSettings.resolve(
            file: try ConfigFile.load(path), flags: ["metrics_listen": .string("[::1]:0"), "metrics_textfile": .string("m.prom")])
        #expect(flagged.metricsListen?.isIPv6 == true && flagged.metricsTextfile == "m.prom")

        try "metrics_listen = \"db.internal:9464\"\nmetrics_textfile = \"relative.prom\"\n".write(toFile: path, atomically: true, encoding: .utf8)
        let error = try #require(throws: ConfigError.self) { try ConfigFile.load(path) }
        #expect(error.description.contains("\(path):1") && error.description.contains("not an IP address"), "\(error)")
        #expect(error.description.contains("\(path):2") && error.description.contains("absolute"), "\(error)")
    }

    @Test func theTextFollowsPrometheusConventions() throws {
        let metrics = SupervisorMetrics(version: "9.9.9")
        metrics.clip(outcome: "ok")
        metrics.clip(outcome: "timeout")
        metrics.request("decode")
        metrics.request("no-such-op")
        metrics.workerKilled(reason: "deadline")
        metrics.workerKilled(reason: "protocol violation")
        metrics.decodeSeconds.record(0.3)
        metrics.publishWorkers(["busy": 2, "idle": 1], livePIDs: [getpid()])
        let text = metrics.text()
        let lines = text.split(separator: "\n").map(String.init)
        #expect(lines.contains("clipvisor_clips_total{outcome=\"ok\"} 1"))
        #expect(lines.contains("clipvisor_clips_total{outcome=\"timeout\"} 1"))
        #expect(lines.contains("clipvisor_clips_total{outcome=\"crashed\"} 0"), "every outcome is there from the start")
        #expect(lines.contains("clipvisor_requests_total{kind=\"unknown\"} 1"))
        #expect(lines.contains("clipvisor_worker_kills_total{reason=\"protocol\"} 1"))
        #expect(lines.contains("clipvisor_workers{state=\"busy\"} 2.0"))
        #expect(lines.contains("clipvisor_decode_seconds_bucket{le=\"0.5\"} 1"))
        #expect(lines.contains("clipvisor_decode_seconds_bucket{le=\"0.25\"} 0"))
        #expect(lines.contains("clipvisor_build_info{version=\"9.9.9\"} 1.0"))
        // Counters end in _total; every sample is ours or the standard process_ set.
        for line in lines where line.hasPrefix("# TYPE") {
            let parts = line.split(separator: " ")
            let name = String(parts[2])
            #expect(name.hasPrefix("clipvisor_") || name.hasPrefix("process_"), "\(name)")
            if parts[3] == "counter" { #expect(name.hasSuffix("_total"), "\(name)") }
        }
        // The worker CPU sum includes the pid published (this process, which has used CPU).
        let cpu = try #require(lines.first { $0.hasPrefix("clipvisor_worker_cpu_seconds_total ") })
        #expect(Double(cpu.split(separator: " ")[1])! > 0)
    }

    @Test func procStatReadsThisProcess() throws {
        let own = try #require(ProcStat.read(pid: nil))
        #expect(own.residentBytes > 1 << 20 && own.virtualBytes > own.residentBytes && own.threads >= 1)
        let now = Date().timeIntervalSince1970
        #expect(own.startTimeSeconds <= now + 1 && own.startTimeSeconds > now - 3600, "\(own.startTimeSeconds) vs \(now)")
        #expect(ProcStat.read(pid: Int32.max) == nil)
        #expect(ProcStat.openFileCount() >= 3)
    }

    @Test func topRendersRatesFromTwoSnapshots() throws {
        func status(decoded: Int, bytes: Int, cpu: Double) -> JSONValue {
            [
                "version": "1.0", "pid": 10, "phase": "running", "uptime_s": 3725, "socket": "/run/s.sock",
                "counters": ["decoded": .number(Double(decoded)), "probed": 0, "bytes_out": .number(Double(bytes)), "skipped": ["timeout": 1]],
                "queue": ["length": 3, "limit": 100], "memory": ["block_bytes_held": 0, "budget": 1024], "connections": 1,
                "workers": [
                    "live": 1, "target": 1, "spare": 0,
                    "list": [["pid": 77, "state": "busy", "clips_done": 4, "cpu_s": .number(cpu), "busy_ms": 1500, "deadline_ms": 30000, "clip": "/data/a.mp4"]],
                ],
                "clients": [["pid": 500, "uid": 1000, "queued": 3, "running": 1]],
            ]
        }
        var first = TopSnapshot(status: status(decoded: 10, bytes: 0, cpu: 1.0))
        first.at = Instant(nanoseconds: 1_000_000_000)
        var second = TopSnapshot(status: status(decoded: 30, bytes: 2 << 20, cpu: 1.5))
        second.at = Instant(nanoseconds: 3_000_000_000)
        second.skips = [["ts": "2026-01-02T03:04:05.678Z", "reason": "timeout", "path": "/data/bad.mp4"]]
        let lines = TopView.render(second, previous: first, width: 200)
        let text = lines.joined(separator: "\n")
        #expect(text.contains("up 1h2m"))
        #expect(text.contains("throughput: 10.0 clips/s, 1.0 MiB/s"), "\(text)")
        #expect(lines.contains { $0.hasPrefix("77") && $0.contains("busy") && $0.contains(" 25 ") && $0.contains("1.5/30 s") && $0.hasSuffix("/data/a.mp4") }, "\(text)")
        #expect(lines.contains { $0.hasPrefix("500") && $0.hasSuffix("1") })
        #expect(text.contains("03:04:05  timeout       /data/bad.mp4"))
        #expect(TopView.render(second, previous: first, width: 30).allSatisfy { $0.count <= 30 })
        #expect(TopView.render(TopSnapshot(error: "refused"), previous: nil, width: 80) == ["clipvisor top: no supervisor answers (refused); retrying"])
    }
}
