import CClipvisorShims
import Shared

#if canImport(Glibc)
import Glibc
#endif

/// The limits and sandbox a serving worker applies to itself before it reads anything
/// (docs/worker-protocol.md, "Spawning").
enum Sandbox {
    struct Limits: Sendable, Equatable {
        var addressSpaceMB: Int?
        var cpuSeconds: Int?
        var openFiles: Int?
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// Dies with the supervisor: PR_SET_PDEATHSIG(SIGKILL), then checks that the parent is still
    /// `parentPID` (it may have died between fork and prctl).
    static func bindToParent(_ parentPID: pid_t) throws(Failure) {
        guard cv_set_parent_death_signal(SIGKILL) == 0 else { throw failure("prctl(PR_SET_PDEATHSIG)") }
        guard getppid() == parentPID else {
            throw Failure(description: "parent \(parentPID) is gone (getppid() = \(getppid()))")
        }
    }

    /// What Landlock did in this process: in force with an ABI, or not, and why.
    struct LandlockOutcome: Sendable, Equatable {
        /// The ABI in force; 0 when writes are not restricted.
        var abi: Int32
        /// Why the write ban is not in force, for `ready` and the supervisor's status; nil when
        /// it is, or when it was switched off on purpose.
        var problem: String?

        static let off = LandlockOutcome(abi: 0, problem: nil)
    }

    /// no_new_privs, resource limits (RLIMIT_CORE always 0), then Landlock as `landlock` says.
    /// A refusal of Landlock alone is not fatal in `.auto`: container runtimes' seccomp filters
    /// (systemd-nspawn's, older Docker and containerd profiles) answer EPERM, and a worker that
    /// exits there leaves the whole service without decoders. The other limits still hold.
    static func apply(limits: Limits, landlock: WorkerMessage.LandlockMode) throws(Failure) -> LandlockOutcome {
        guard cv_set_no_new_privs() == 0 else { throw failure("prctl(PR_SET_NO_NEW_PRIVS)") }
        try setLimit(RLIMIT_CORE, 0, "RLIMIT_CORE")
        if let mb = limits.addressSpaceMB { try setLimit(RLIMIT_AS, UInt64(mb) << 20, "RLIMIT_AS") }
        if let s = limits.cpuSeconds {
            // Soft limit raises SIGXCPU (reported as timeout); the hard limit a second later kills.
            try setLimit(RLIMIT_CPU, UInt64(s), "RLIMIT_CPU", hard: UInt64(s) + 1)
        }
        if let n = limits.openFiles { try setLimit(RLIMIT_NOFILE, UInt64(n), "RLIMIT_NOFILE") }
        if landlock == .off { return .off }
        let abi = cv_landlock_forbid_writes()
        if abi > 0 { return LandlockOutcome(abi: abi, problem: nil) }
        let err = errno
        let problem = landlockRefusal(err)
        if landlock == .required {
            throw Failure(description: "Landlock is required (sandbox = \"required\") but unavailable: \(problem)")
        }
        return LandlockOutcome(abi: 0, problem: problem)
    }

    /// Names the layer that refused Landlock, from the errno of landlock_create_ruleset(2) or
    /// landlock_restrict_self(2), so an operator knows whether to change the kernel or the container.
    static func landlockRefusal(_ err: Int32) -> String {
        let cause =
            switch err {
            case ENOSYS: "the kernel has no Landlock (Linux 5.13+ with CONFIG_SECURITY_LANDLOCK)"
            case EOPNOTSUPP: "Landlock is built in but not enabled (add landlock to the kernel's lsm= boot parameter)"
            case EPERM: "refused by a seccomp filter or security policy (container runtimes such as systemd-nspawn, Docker and containerd do this)"
            default: "the kernel refused it"
            }
        return "\(cause): \(String(cString: strerror(err))) (errno \(err))"
    }

    /// Crashes go straight to the kernel: the Swift runtime's backtracer would otherwise spend
    /// seconds symbolicating a codec segfault before the supervisor learns of it.
    static func defaultCrashSignals() {
        for sig in [SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP] { signal(sig, SIG_DFL) }
    }

    private static func setLimit(
        _ resource: __rlimit_resource, _ soft: UInt64, _ name: String, hard: UInt64? = nil
    ) throws(Failure) {
        var current = rlimit()
        getrlimit(__rlimit_resource_t(resource.rawValue), &current)
        var hardValue = hard ?? soft
        if current.rlim_max != rlim_t.max { hardValue = min(hardValue, UInt64(current.rlim_max)) }
        var value = rlimit(rlim_cur: rlim_t(min(soft, hardValue)), rlim_max: rlim_t(hardValue))
        guard setrlimit(__rlimit_resource_t(resource.rawValue), &value) == 0 else { throw failure("setrlimit(\(name))") }
    }

    private static func failure(_ what: String, _ err: Int32 = errno) -> Failure {
        Failure(description: "\(what): \(String(cString: strerror(err))) (errno \(err))")
    }
}
