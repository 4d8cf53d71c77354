import ArgumentParser
import Shared

/// `clipvisor`: the supervisor (`serve`) and its command-line clients.
struct Clipvisor: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clipvisor",
        abstract: "A fault-tolerant media decode supervisor for training loops: no clip can hang or crash the job.",
        discussion: """
            `clipvisor serve` runs the supervisor. The other commands are clients: they talk to a \
            running supervisor (found through $CLIPVISOR_SOCKET, /run/clipvisor/clipvisor.sock or the \
            per-user socket), and `decode`/`probe` start an embedded one for the call when none answers \
            (when the system service's socket refuses you, only with --private or CLIPVISOR_PRIVATE=1). \
            `clipvisor reload` makes a running supervisor reopen its skip log (the unit's ExecReload=).
            """,
        version: ClipvisorVersion.string,
        subcommands: [
            ServeCommand.self, DecodeCommand.self, ProbeCommand.self, StatusCommand.self, SkipsCommand.self,
            MetricsCommand.self, TopCommand.self, ReloadCommand.self,
        ])
}

Clipvisor.main()
