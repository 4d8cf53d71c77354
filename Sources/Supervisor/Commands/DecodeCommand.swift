import ArgumentParser
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

struct DecodeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decode",
        abstract: "Decode one clip through the supervisor (or an embedded one when none runs).",
        discussion: """
            Prints the tensor shapes, sample fps, frame times and elapsed time, or the reason the clip \
            was skipped. With --out, the block (docs/block-format.md) is written to a file; `zstd -d` \
            on it yields the raw tensor bytes. Exit status: 0 decoded, 1 skipped (the reason is printed), \
            2 no supervisor or a protocol failure.
            """)

    @Argument(help: "The media file.")
    var path: String

    @OptionGroup var decode: DecodeArguments

    @Option(help: ArgumentHelp("Deadline for this clip, seconds (default: the supervisor's).", valueName: "seconds"))
    var deadline: Double?

    @Option(help: ArgumentHelp("A tag recorded in the skip log (job or sample id).", valueName: "text"))
    var tag: String?

    @Option(help: ArgumentHelp("Write the block to this file.", valueName: "file"))
    var out: String?

    @Flag(help: "Open the file here and pass the fd (for a supervisor in another mount namespace).")
    var passFd = false

    @Flag(help: "Print JSON: the result, or {reason, message, path}.")
    var json = false

    @OptionGroup var connection: ConnectionOptions

    @OptionGroup var privateFallback: PrivateFallbackOption

    func run() throws {
        let options: DecodeOptions
        do {
            options = try decode.decodeOptions()
        } catch {
            throw ValidationError(error.message)
        }
        let absolute = absolutePath(path)
        var request = options.json
        request["op"] = "decode"
        request["path"] = .string(absolute)
        if let deadline { request["deadline_ms"] = .number((deadline * 1000).rounded()) }
        if let tag { request["tag"] = .string(tag) }
        try ClipCall(
            path: absolute, request: request, passFD: passFd, json: json, connection: connection,
            allowPrivate: privateFallback.enabled).run { answer, block in
            try report(answer, block: block)
        }
    }

    private func report(_ answer: JSONValue, block: FileDescriptor?) throws {
        guard let block else { throw ClipCall.Problem("the supervisor sent a result without its block") }
        let mapped = try MappedFile(fd: block)
        let layout = try BlockReader.validate(mapped.bytes)
        if let out {
            let fd = try FileDescriptor.open(out, .writeOnly, options: [.create, .truncate], permissions: [.ownerReadWrite, .groupRead, .otherRead])
            defer { try? fd.close() }
            _ = try fd.writeAll(mapped.bytes)
        }
        let result = answer["result"] ?? .null
        if json {
            print(JSONValue.object(["result": result, "block_bytes": answer["block_bytes"] ?? .null, "elapsed_ms": answer["elapsed_ms"] ?? .null]).jsonString)
            return
        }
        print(ResultSummary.render(result, tensors: layout.header.tensors, elapsedMs: answer["elapsed_ms"]?.intValue, out: out))
    }
}

struct ProbeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe", abstract: "Describe a media file's container and streams (through a worker, under a deadline).")

    @Argument(help: "The media file.")
    var path: String

    @Option(help: ArgumentHelp("Deadline, seconds.", valueName: "seconds"))
    var deadline: Double?

    @Flag(help: "Open the file here and pass the fd.")
    var passFd = false

    @OptionGroup var connection: ConnectionOptions

    @OptionGroup var privateFallback: PrivateFallbackOption

    func run() throws {
        let absolute = absolutePath(path)
        var request: [String: JSONValue] = ["op": "probe", "path": .string(absolute)]
        if let deadline { request["deadline_ms"] = .number((deadline * 1000).rounded()) }
        try ClipCall(
            path: absolute, request: request, passFD: passFd, json: true, connection: connection,
            allowPrivate: privateFallback.enabled).run { answer, _ in
            print((answer["probe"] ?? .null).jsonString)
        }
    }
}

/// One clip request from the CLI: connect (or embed), send, wait within the deadline, and
/// turn a skip into a printed reason and exit status 1.
struct ClipCall {
    struct Problem: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    var path: String
    var request: [String: JSONValue]
    var passFD: Bool
    var json: Bool
    var connection: ConnectionOptions
    var allowPrivate = false

    func run(onSuccess: (JSONValue, FileDescriptor?) throws -> Void) throws {
        let (client, embedded) = try connectOrEmbed(connection, allowPrivate: allowPrivate, quiet: json)
        defer { embedded?.stop() }
        var request = request
        var clipFD: FileDescriptor?
        if passFD {
            clipFD = try FileDescriptor.open(path, .readOnly, options: [.closeOnExec])
            request["fd"] = true
        }
        defer { try? clipFD?.close() }
        let deadlineMs = request["deadline_ms"]?.intValue ?? client.hello["deadline_ms_default"]?.intValue ?? 30_000
        // The deadline runs from dispatch; allow for queueing and transfer on top.
        let waitMs = Int32(min(Int(Int32.max), deadlineMs + 70_000))
        let (answer, block) = try client.call(request, passing: clipFD, timeoutMs: waitMs)
        defer { try? block?.close() }
        guard answer["ok"]?.boolValue == true else {
            let failure = answer["error"].flatMap(DecodeFailure.init(json:))
                ?? DecodeFailure(.invalidRequest, "unreadable answer: \(answer.jsonString)")
            if json {
                var object = failure.json
                if case .object(var fields) = object, fields["path"] == nil {
                    fields["path"] = .string(path)
                    object = .object(fields)
                }
                print(object.jsonString)
            } else {
                FileOutput.standardError("clipvisor: \(failure.reason): \(failure.message)\(failure.detail.map { " [\($0)]" } ?? "")\n")
            }
            throw ExitCode(1)
        }
        try onSuccess(answer, block)
    }
}

/// The human summary of a decode.
enum ResultSummary {
    static func render(_ result: JSONValue, tensors: [BlockTensor], elapsedMs: Int?, out: String?) -> String {
        var lines: [String] = []
        lines.append(result["path"]?.stringValue ?? "?")
        for tensor in tensors {
            lines.append("  \(tensor.name): \(tensor.shape.map(String.init).joined(separator: "×")) \(tensor.dtype.rawValue) \(tensor.layout)")
        }
        if let video = result["video"], video != .null {
            let pts = video["pts"]?.arrayValue?.compactMap(\.doubleValue) ?? []
            let shown = pts.count <= 8
                ? pts.map { format($0) }.joined(separator: " ")
                : (pts.prefix(4).map { format($0) } + ["…"] + pts.suffix(3).map { format($0) }).joined(separator: " ")
            lines.append("  sample_fps \(format(video["sample_fps"]?.doubleValue ?? 0)), access \(video["access"]?.stringValue ?? "?")")
            lines.append("  pts [\(shown)]")
        }
        if let audio = result["audio"], audio != .null {
            lines.append("  audio \(StatusReport.number(audio["sample_rate"])) Hz, starts at \(format(audio["start"]?.doubleValue ?? 0)) s")
        }
        if result["partial"]?.boolValue == true {
            lines.append("  PARTIAL: \(result["partial_detail"]?.stringValue ?? "damaged stream")")
        }
        for warning in result["warnings"]?.arrayValue ?? [] {
            lines.append("  warning: \(warning.stringValue ?? warning.jsonString)")
        }
        var timing = "  decoded in \(format(result["decode_seconds"]?.doubleValue ?? 0)) s"
        if let elapsedMs { timing += ", answered in \(elapsedMs) ms" }
        lines.append(timing)
        if let out { lines.append("  block written to \(out)") }
        return lines.joined(separator: "\n")
    }

    static func format(_ value: Double) -> String {
        let scaled = (value * 1000).rounded() / 1000
        return JSONValue.format(scaled)
    }
}
