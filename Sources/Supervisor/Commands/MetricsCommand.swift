import ArgumentParser
import Shared

/// `clipvisor metrics`: the Prometheus text of the running supervisor, through its socket.
struct MetricsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "metrics",
        abstract: "Print the running supervisor's Prometheus metrics (text exposition format).",
        discussion: """
            The same text that `serve --metrics-listen` serves over HTTP and `--metrics-textfile` \
            writes, asked through the Unix socket, so it works without any listener. See \
            docs/operations.md for what each metric means.
            """)

    @OptionGroup var connection: ConnectionOptions

    func run() throws {
        let client = try SupervisorClient.connect(candidates: connection.candidates)
        let (answer, _) = try client.call(["op": "metrics"], timeoutMs: 5000)
        guard answer["ok"]?.boolValue == true, let text = answer["text"]?.stringValue else {
            throw SupervisorClient.Failure(answer["error"]?["message"]?.stringValue ?? "the supervisor did not send metrics")
        }
        print(text, terminator: "")
    }
}
