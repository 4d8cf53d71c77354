import Foundation
import Testing

@testable import Supervisor

/// Config files that bench/fuzz.sh (libFuzzer on `ConfigFile.parse`) found to abort the whole
/// supervisor: toml++ asserts on them instead of reporting an error. Each must be refused like any
/// other bad file (exit status 78, file:line:column), and files that merely look similar must
/// still parse. The crashing inputs run in a child `clipvisor serve`, so a regression fails this
/// test instead of aborting the test runner.
@Suite(.serialized, .timeLimit(.minutes(2)))
struct ConfigFuzzRegressionTests {
    /// (file text, line, column, words of the message)
    static let crashers: [(String, Int, Int, String)] = [
        ("[\n", 1, 2, "a table header needs a key after '[', saw a newline"),
        ("workers = 2\n[[ # a comment\n", 2, 4, "a table header needs a key after '[', saw '#'"),
        ("\u{FEFF}[[[[[", 1, 3, "a table header needs a key after '[', saw '['"),
        ("o=[}", 1, 4, "'}' inside an array"),
        ("roots = [\n  \"/data\",\n}\n", 3, 1, "'}' inside an array"),
        ("w='''''''#'[\n[\n", 2, 2, "a table header needs a key after '[', saw a newline"),
        ("a = 1979-05-27 7\n", 1, 16, "a date needs a full time after the space (HH:MM:SS)"),
        ("8=4888--=--= 8 ", 1, 14, "a date needs a full time after the space (HH:MM:SS)"),
        ("8=4888--=--= 8\u{FEFF}", 1, 14, "a date needs a full time after the space (HH:MM:SS)"),
    ]

    @Test(arguments: 0..<crashers.count)
    func aFileThatCrashedTheTOMLParserIsRefusedWithItsLine(_ index: Int) throws {
        let (text, line, column, words) = Self.crashers[index]
        let directory = TemporaryDirectory("fuzzcfg")
        let path = directory.file("c.toml")
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Binaries.supervisor)
        process.arguments = ["serve", "--config", path, "--socket", directory.file("s.sock")]
        let pipe = Pipe()
        process.standardError = pipe
        process.environment = ProcessInfo.processInfo.environment.merging(["SWIFT_BACKTRACE": "enable=no"]) { $1 }
        try process.run()
        process.waitUntilExit()
        let stderr = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(process.terminationReason == .exit, "killed by a signal: \(stderr)")
        #expect(process.terminationStatus == ServeCommand.configurationExitCode, "\(stderr)")
        #expect(stderr.contains("\(path):\(line):\(column): TOML syntax error: \(words)"), "\(stderr)")
    }

    @Test func bracketsInStringsCommentsAndValuesAreNotMistakenForBadHeaders() throws {
        let text = """
            \u{FEFF}# [ a comment that looks like a header
            workers = 2
            roots = [
              "/data/[x]",   # ]
              '/mnt/}{',
            ]
            socket = "/tmp/[.sock"
            """
        let file = try ConfigFile.parse(text, path: "/etc/c.toml")
        #expect(file.values["workers"] != nil && file.values["roots"] != nil && file.values["socket"] != nil)
        #expect(TOMLHeaderCheck.firstKeylessHeader(in: "d = 1979-05-27 07:32:00\ne = 1979-05-27\nf = [2024, 5]\n") == nil)
        #expect(TOMLHeaderCheck.firstKeylessHeader(in: "a = [[1], [2]]\nb = { c = [3] }\n[t]\n[[u]]\n") == nil)
        #expect(TOMLHeaderCheck.firstKeylessHeader(in: "s = \"\"\"\n[\n}\n\"\"\"\nt = '''\n[[\n'''\n") == nil)
    }
}
