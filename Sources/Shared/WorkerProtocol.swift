/// Messages between the supervisor and a decode worker (docs/worker-protocol.md). They travel
/// as one JSON object per SOCK_SEQPACKET datagram, so the kernel keeps message boundaries and
/// an fd (a clip passed by a client, or the finished block) rides with its message.
public enum WorkerMessage {
    /// Largest datagram either side accepts, and the buffer size the supervisor asks for the
    /// channel. The kernel may grant less (see `cv_unix_seqpacket_pair`); what fits is bounded
    /// by `DecodeOptions.maxFramesPerClip`, and a job that still does not fit is refused alone.
    public static let maxSize = 4 << 20

    /// Exit codes of `clipvisor-worker serve`, documented so the supervisor can tell a clean
    /// recycle from a start-up failure.
    public enum ExitCode: Int32, Sendable {
        /// Served its clip quota or saw its control socket close.
        case recycled = 0
        /// Bad command line (a supervisor/worker version mismatch).
        case usage = 64
        /// Could not apply its limits or sandbox at start.
        case sandbox = 71
        /// The control socket failed or sent a malformed message.
        case protocolError = 76
    }

    /// What a worker does about Landlock, its file-system write ban (docs/worker-protocol.md,
    /// "Spawning"). The config file's `sandbox` key and `clipvisor-worker serve --landlock`.
    public enum LandlockMode: String, Sendable, CaseIterable {
        /// Apply it where the kernel and the container allow; where they refuse (a kernel
        /// without Landlock, a seccomp filter that answers EPERM, as container runtimes do),
        /// decode with the remaining limits and say why in `ready`.
        case auto
        /// Refuse to serve without it: the worker exits 71 and no clip is decoded.
        case required
        /// Do not apply it (debugging, and tests of the sandbox itself).
        case off
    }

    /// Environment variable that turns on test-only fault switches in workers. Only whoever
    /// starts the supervisor can set it; no request can.
    public static let faultEnvironmentKey = "CLIPVISOR_TEST_FAULTS"
}
