import Foundation
import Testing

@testable import Supervisor

/// The knobs are defined once (ConfigKey.table); the example file, the docs' table, the flags
/// and the settings all come from there. These tests fail when a committed file drifts.
@Suite struct ConfigReferenceTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../..").standardized

    @Test func theExampleFileIsMadeFromTheTable() throws {
        let committed = try String(contentsOf: Self.repository.appendingPathComponent("systemd/clipvisor.toml"), encoding: .utf8)
        #expect(committed == ConfigReference.exampleFile(), "run `clipvisor serve --print-example-config > systemd/clipvisor.toml`")
    }

    @Test func theDocsTableIsMadeFromTheTable() throws {
        let docs = try String(contentsOf: Self.repository.appendingPathComponent("docs/configuration.md"), encoding: .utf8)
        #expect(docs.contains(ConfigReference.markdownTable()), "regenerate the table in docs/configuration.md from ConfigReference.markdownTable()")
    }

    /// Every knob is a flag of `serve` whose value reaches the same setting as the file's key.
    @Test(arguments: ConfigKey.table.map(\.name))
    func everyKnobIsAFlagThatSetsWhatTheFileSets(name: String) throws {
        let key = ConfigKey.named(name)
        let directory = TemporaryDirectory("knob")
        let file = directory.file("one.toml")
        try "\(key.name) = \(key.example)\n".write(toFile: file, atomically: true, encoding: .utf8)
        let fromFile = try ServeCommand.parse(["--config", file]).resolveSettings()
        let flagValue = try ConfigFile.load(file).values[key.name]!
        let argument: [String] =
            switch flagValue {
            case .strings(let paths): paths.flatMap { [key.flag, $0] }
            case .string(let text): [key.flag, text]
            case .integer(let number): [key.flag, String(number)]
            case .number(let seconds): [key.flag, String(seconds)]
            case .bool(let on): [key.flag, on ? "auto" : "off"]
            }
        let command = try ServeCommand.parse(argument)
        #expect(argument.count <= 1 || command.flagValues[key.name] != nil || flagValue == .strings([]), "\(key.flag) is not read as \(key.name)")
        let fromFlag = try command.resolveSettings()
        #expect(String(describing: fromFlag.configuration) == String(describing: fromFile.configuration))
        #expect(fromFlag.skipLogPath == fromFile.skipLogPath && fromFlag.logLevel == fromFile.logLevel)
        #expect(fromFlag.metricsIntervalMs == fromFile.metricsIntervalMs && fromFlag.quarantineImportPath == fromFile.quarantineImportPath)
    }

    @Test func propertyNamesMapToKeys() {
        #expect(ConfigKey.name(ofProperty: "_maxWorkers") == "max_workers")
        #expect(ConfigKey.name(ofProperty: "roots") == "roots")
        #expect(ConfigKey.name(ofProperty: "_workerCpuSeconds") == "worker_cpu_seconds")
    }
}
