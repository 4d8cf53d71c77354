import FlyingFox
import FlyingSocks
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Where `--metrics-listen` serves: an IP literal and a port. Names are not resolved, so the
/// socket binds exactly the address written in the configuration and nothing wider.
struct MetricsAddress: Equatable, Sendable, CustomStringConvertible {
    var host: String
    var port: UInt16
    var isIPv6: Bool

    var description: String { isIPv6 ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// "127.0.0.1:9464", "[::1]:9464", "localhost:9464", or a bare port "9464" / ":9464"
    /// (loopback). Returns what is wrong, for the config error.
    static func parse(_ text: String) -> Result<MetricsAddress, ParseError> {
        var host = "127.0.0.1"
        var portText = Substring(text)
        var isIPv6 = false
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                return .failure(ParseError("an IPv6 address needs the form [ADDRESS]:PORT, got \"\(text)\""))
            }
            host = String(text[text.index(after: text.startIndex)..<close])
            portText = text[text.index(close, offsetBy: 2)...]
            isIPv6 = true
        } else if let colon = text.lastIndex(of: ":") {
            let name = text[..<colon]
            if !name.isEmpty { host = name == "localhost" ? "127.0.0.1" : String(name) }
            portText = text[text.index(after: colon)...]
        }
        guard let port = UInt16(portText) else {
            return .failure(ParseError("the port must be a number 0...65535, got \"\(portText)\" in \"\(text)\""))
        }
        var buffer = [UInt8](repeating: 0, count: 16)
        guard inet_pton(isIPv6 ? AF_INET6 : AF_INET, host, &buffer) == 1 else {
            return .failure(ParseError("\"\(host)\" is not an IP address (names are not resolved: write 127.0.0.1, [::1] or the interface's address)"))
        }
        return .success(MetricsAddress(host: host, port: port, isIPv6: isIPv6))
    }

    struct ParseError: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    /// Whether only this machine can connect (127.0.0.0/8 or ::1).
    var isLoopback: Bool { isIPv6 ? host == "::1" : host.hasPrefix("127.") }
}

/// The scrape endpoint: `GET /metrics` over HTTP/1.1 (FlyingFox), run by Swift concurrency's
/// threads and FlyingFox's own epoll thread, never on the supervisor's event loop (the main
/// thread). A scrape reads only `SupervisorMetrics`, which is `Sendable`; a scraper that stalls
/// holds a task and a socket here, not the loop.
enum MetricsListener {
    struct BindFailure: Error, CustomStringConvertible {
        var description: String
    }

    /// The bind's result, handed from the server task to the thread that starts it.
    private final class SharedOutcome: Sendable {
        let value = Mutex<Result<MetricsAddress, BindFailure>?>(nil)
    }

    /// Binds `address` and starts serving; returns the bound address (the real port when 0 was
    /// asked). Throws when the address cannot be bound, so `serve` refuses to start rather
    /// than run without the metrics it was configured to serve.
    static func start(_ address: MetricsAddress, metrics: SupervisorMetrics, logger: Logger) throws(BindFailure) -> MetricsAddress {
        let quiet: some FlyingSocks.Logging = .disabled
        let server: HTTPServer
        if address.isIPv6 {
            var socketAddress = sockaddr_in6()
            socketAddress.sin6_family = sa_family_t(AF_INET6)
            socketAddress.sin6_port = address.port.bigEndian
            _ = inet_pton(AF_INET6, address.host, &socketAddress.sin6_addr)
            server = HTTPServer(address: socketAddress, timeout: 5, logger: quiet)
        } else {
            var socketAddress = sockaddr_in()
            socketAddress.sin_family = sa_family_t(AF_INET)
            socketAddress.sin_port = address.port.bigEndian
            _ = inet_pton(AF_INET, address.host, &socketAddress.sin_addr)
            server = HTTPServer(address: socketAddress, timeout: 5, logger: quiet)
        }
        let outcome = SharedOutcome()
        Task.detached {
            await server.appendRoute("GET /metrics") { _ in
                HTTPResponse(statusCode: .ok, headers: [.contentType: SupervisorMetrics.contentType], body: Data(metrics.text().utf8))
            }
            await server.appendRoute("GET /") { _ in
                HTTPResponse(statusCode: .ok, headers: [.contentType: "text/plain; charset=utf-8"], body: Data("clipvisor: metrics at /metrics\n".utf8))
            }
            let listening = Task {
                try await server.waitUntilListening(timeout: 10)
                var bound = address
                if case .ip4(_, let port) = await server.listeningAddress { bound.port = port }
                if case .ip6(_, let port) = await server.listeningAddress { bound.port = port }
                outcome.value.withLock { $0 = $0 ?? .success(bound) }
            }
            do {
                try await server.run()
                logger.error("the metrics listener on \(address) stopped")
            } catch {
                listening.cancel()
                let message = "cannot serve metrics on \(address): \(error)"
                let first = outcome.value.withLock { value in
                    defer { if value == nil { value = .failure(BindFailure(description: message)) } }
                    return value == nil
                }
                if !first { logger.error("\(message)") }
            }
        }
        // Start-up waits for the bind so that an address in use is a start-up error.
        let until = Instant.now().adding(milliseconds: 15_000)
        while Instant.now() < until {
            if let result = outcome.value.withLock({ $0 }) { return try result.get() }
            usleep(2_000)
        }
        throw BindFailure(description: "the metrics listener on \(address) did not start within 15 s")
    }
}
