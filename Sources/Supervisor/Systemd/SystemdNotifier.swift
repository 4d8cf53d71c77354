import CSystemd

#if canImport(Glibc)
import Glibc
#endif

/// The service manager's notification socket (sd_notify(3)): `READY=1`, `STATUS=`,
/// `WATCHDOG=1`, `STOPPING=1`, `MAINPID=`.
///
/// Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op, so `clipvisor serve` behaves
/// the same as a plain sidecar. The environment is left in place (libsystemd reads it on each
/// call); workers inherit it but never notify, and `NotifyAccess=main` ignores them anyway.
struct SystemdNotifier: Sendable {
    /// Whether a service manager listens (`NOTIFY_SOCKET` is set).
    let isEnabled: Bool
    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, in nanoseconds; nil when the
    /// watchdog is off or meant for another process (`WATCHDOG_PID` names someone else).
    let watchdogPingIntervalNs: UInt64?

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (through sd_watchdog_enabled(3),
    /// which checks that `WATCHDOG_PID` is unset or ours).
    static func fromEnvironment() -> SystemdNotifier {
        let enabled = SocketDiscovery.environment("NOTIFY_SOCKET") != nil
        var usec: UInt64 = 0
        let watchdog = enabled && sd_watchdog_enabled(0, &usec) > 0 && usec > 0
        return SystemdNotifier(isEnabled: enabled, watchdogPingIntervalNs: watchdog ? usec * 1000 / 2 : nil)
    }

    /// Sends one notification (several `KEY=value` lines may be joined with `\n`); sd_notify(3).
    /// Returns whether it was delivered; a failure is not fatal (the manager may be restarting).
    @discardableResult
    func send(_ state: String) -> Bool {
        guard isEnabled else { return false }
        return sd_notify(0, state) > 0
    }

    /// `STATUS=` text for the manager: one line, no control characters, bounded.
    static func statusValue(_ text: String) -> String {
        var cleaned = String(text.map { $0.isNewline || $0 == "\t" ? " " : $0 })
        if cleaned.utf8.count > 400 { cleaned = String(cleaned.prefix(400)) + "…" }
        return cleaned
    }
}
