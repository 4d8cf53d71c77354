import ArgumentParser
import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `clipvisor-worker`: the only clipvisor process that links FFmpeg.
struct WorkerCommand: ParsableCommand {
    static let version = ClipvisorVersion.string

    static let configuration = CommandConfiguration(
        commandName: "clipvisor-worker",
        abstract: "Decode media clips into clipvisor blocks (the only clipvisor process that runs FFmpeg).",
        discussion: """
            Exit codes of probe and decode: 0 success (a result may still be `partial`: see its
            `partial_detail`); 1 the clip could not be decoded: the error is printed on stdout as JSON
            {"reason", "message", "path", "detail"}, reason from the fixed set (decode_error,
            unsupported, too_large, not_found, permission, out_of_memory, invalid_request);
            64 bad command line. serve: see docs/worker-protocol.md (0 recycled, 64 usage,
            71 sandbox/limits failed at start, 76 control-socket protocol error).
            See docs/decoding.md for frame selection, the time origin, resizing and rotation.
            """,
        version: version,
        subcommands: [ProbeCommand.self, DecodeCommand.self, ServeCommand.self, SandboxCheckCommand.self]
    )
}

/// Prints a JSON value on stdout, one line.
func printJSON(_ value: JSONValue) {
    print(value.jsonString)
}

/// Prints a failure as the protocol's error object and exits 1.
func fail(_ failure: DecodeFailure) -> Never {
    printJSON(failure.json)
    Glibc.exit(1)
}

struct ProbeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe",
        abstract: "Describe a media file as JSON: container, duration, size, streams (codec, size, pixel format, fps, frame count and its source, rotation, audio rate/channels/layout, start time), without decoding frames.")

    @Argument(help: "The media file.")
    var path: String

    func run() throws {
        do {
            printJSON(try Prober.probe(path: path, displayPath: path))
        } catch {
            fail(error)
        }
    }
}

struct DecodeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decode",
        abstract: "Decode the frames (and audio) of one clip into a block; print the result metadata as JSON.",
        discussion: """
            Frame selection: --fps (default 2.0, Qwen2.5-VL's rule with --min-frames/--max-frames/
            --frame-factor), or --frames N, or --timestamps t,t,..., over [--start, --end). Times are
            seconds from the first video frame (0). Resize: --width with --height, or a Qwen pixel
            budget (--max-pixels, --min-pixels, --total-pixels, --factor); no resize otherwise.
            Frames are RGB24 uint8, upright (display matrix applied) unless --no-rotate.
            Audio: --audio adds the best audio stream as float32 planar (channels, samples) at
            --sample-rate (16000) and --channels (1), over the same range and time origin; with video
            it covers exactly the video range. --no-video decodes the audio alone; --audio-optional
            accepts a video without audio. See docs/decoding.md, "Audio".
            """)

    @Argument(help: "The media file.")
    var path: String

    @OptionGroup var decode: DecodeArguments

    @Option(help: "Also write the block to this file (the same bytes as the memfd).")
    var out: String?

    @Option(help: "How frames are reached: auto (default), seek or sequential. Both give the same frames; for tests and benchmarks.")
    var access: String = "auto"

    func run() throws {
        do {
            guard let policy = AccessPolicy(rawValue: access) else {
                throw FieldReader.invalid("access", "must be auto, seek or sequential")
            }
            let options = try decode.decodeOptions()
            let clip = try ClipDecoder.decode(ClipRequest(path: path, displayPath: path, options: options, access: policy))
            if let out, let fd = clip.block?.fd {
                try copyBlock(from: fd, bytes: clip.blockBytes, to: out)
            }
            printJSON(JSONCoding.encode(clip.result))
        } catch let failure as DecodeFailure {
            fail(failure)
        } catch {
            fail(DecodeFailure(.decodeError, "\(path): \(error)", path: path))
        }
    }

    /// Copies the sealed block to a file.
    private func copyBlock(from fd: FileDescriptor, bytes: Int, to out: String) throws(DecodeFailure) {
        do {
            let file = try FileDescriptor.open(
                out, .writeOnly, options: [.create, .truncate], permissions: [.ownerReadWrite, .groupRead, .otherRead])
            defer { try? file.close() }
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var offset = 0
            while offset < bytes {
                let n = try buffer.withUnsafeMutableBytes { raw in
                    try fd.read(fromAbsoluteOffset: Int64(offset), into: raw, retryOnInterrupt: true)
                }
                guard n > 0 else { break }
                _ = try buffer.withUnsafeBytes { raw in
                    try file.writeAll(UnsafeRawBufferPointer(rebasing: raw[0..<n]))
                }
                offset += n
            }
        } catch {
            let errno = error as? Errno
            throw DecodeFailure(
                errno == .permissionDenied ? .permission : .decodeError, "\(out): cannot write the block: \(error)",
                path: out)
        }
    }
}

struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve decode and probe jobs on a control socket (started by `clipvisor serve`; docs/worker-protocol.md).",
        discussion: """
            Before reading anything: PR_SET_PDEATHSIG(SIGKILL) and a parent-pid check, no_new_privs,
            the resource limits given, and a Landlock ban on file-system writes. Then it sends `ready`
            and answers one job at a time. Exit codes: 0 recycled (served --max-clips, replied with
            `exiting` after a failed job, or the control socket closed), 64 bad command line,
            71 limits or sandbox could not be applied, 76 control-socket error or malformed message.
            Test-only fault switches come from the environment variable CLIPVISOR_TEST_FAULTS.
            """)

    @Option(help: "The fd of the SOCK_SEQPACKET control socket.")
    var controlFd: Int32 = 3

    @Option(help: "The supervisor's pid: the worker exits at once if its parent is another process.")
    var parentPid: Int32

    @Option(help: "Exit after this many jobs (the reply to the last one says `exiting`).")
    var maxClips: Int?

    @Option(help: "RLIMIT_AS in MiB (address space).")
    var addressSpaceMb: Int?

    @Option(help: "RLIMIT_CPU in seconds, over the worker's lifetime.")
    var cpuSeconds: Int?

    @Option(help: "RLIMIT_NOFILE.")
    var openFiles: Int?

    @Option(help: ArgumentHelp(
        "Landlock write ban: auto (apply it where the kernel and container allow, else say why in `ready`), required (exit 71 without it), off.",
        valueName: "mode"))
    var landlock: WorkerMessage.LandlockMode = .auto

    @Flag(help: "Same as --landlock off.")
    var noSandbox = false

    @Flag(help: ArgumentHelp(
        "Be the supervisor's fork server: clone workers with these options on request instead of decoding (docs/worker-protocol.md, \"The fork server\").",
        visibility: .hidden))
    var forkServer = false

    func validate() throws {
        if let maxClips, maxClips < 1 { throw ValidationError("--max-clips must be at least 1") }
        if let addressSpaceMb, addressSpaceMb < 64 { throw ValidationError("--address-space-mb must be at least 64") }
        if let cpuSeconds, cpuSeconds < 1 { throw ValidationError("--cpu-seconds must be at least 1") }
        if let openFiles, openFiles < 16 { throw ValidationError("--open-files must be at least 16") }
        if controlFd < 0 { throw ValidationError("--control-fd must be an open fd") }
    }

    func run() throws {
        let config = WorkerServer.Configuration(
            controlFD: controlFd, parentPID: parentPid, maxClips: maxClips,
            limits: Sandbox.Limits(addressSpaceMB: addressSpaceMb, cpuSeconds: cpuSeconds, openFiles: openFiles),
            landlock: noSandbox ? .off : landlock)
        let faults = Faults.fromEnvironment()
        let code = forkServer ? ForkServer(config: config, faults: faults).run() : WorkerServer(config, faults: faults).run()
        // _exit: nothing is buffered (stdout is /dev/null, stderr unbuffered, blocks are fds), and
        // the ~135 libraries' exit handlers and destructors would fault in pages of theirs for
        // nothing: ~10 % of a recycled clone's page faults.
        _exit(code)
    }
}

/// Applies the serve sandbox to this process and reports what a write attempt meets. For tests:
/// it runs the very code `serve` runs (`Sandbox.apply`), in the worker binary itself, without
/// adding a write path that a request could reach.
struct SandboxCheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandbox-check",
        abstract: "Apply serve's sandbox, then try to create PATH and to write a memfd; print the outcome as JSON (for tests).",
        shouldDisplay: false)

    @Option(help: "A file to try to create after the sandbox is in force.")
    var write: String

    @Option(help: "Landlock mode, as for serve.")
    var landlock: WorkerMessage.LandlockMode = .auto

    func run() throws {
        let outcome: Sandbox.LandlockOutcome
        do { outcome = try Sandbox.apply(limits: Sandbox.Limits(), landlock: landlock) } catch {
            printJSON(["error": .string(error.description)])
            Glibc.exit(71)
        }
        let fd = open(write, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        let fileErrno = fd < 0 ? errno : 0
        if fd >= 0 { close(fd) }
        var memfdWrite = false
        if let memfd = try? SharedMemory.createSealable(name: "clipvisor-sandbox-check") {
            let bytes: [UInt8] = [1, 2, 3, 4]
            memfdWrite = (try? bytes.withUnsafeBytes { try memfd.writeAll($0) }) == 4
            try? memfd.close()
        }
        printJSON([
            "landlock": .number(Double(outcome.abi)), "landlock_problem": outcome.problem.map { .string($0) } ?? .null,
            "file_created": .bool(fd >= 0), "file_errno": .number(Double(fileErrno)), "memfd_write": .bool(memfdWrite),
        ])
    }
}

extension WorkerMessage.LandlockMode: ExpressibleByArgument {}
