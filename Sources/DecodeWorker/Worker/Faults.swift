import Shared

#if canImport(Glibc)
import Glibc
#endif

/// Test-only fault switches from `CLIPVISOR_TEST_FAULTS` (docs/worker-protocol.md): set by whoever
/// starts the supervisor, never by a request.
struct Faults: Sendable, Equatable {
    var crashOn: [String] = []
    var abortOn: [String] = []
    /// Paths on which the worker spins forever, busy on the CPU (`spin-on`, or its older name `hang-on`).
    var hangOn: [String] = []
    /// Paths on which the worker blocks forever using no CPU, like a read from a stalled mount.
    var sleepOn: [String] = []
    var oomOn: [String] = []
    /// Paths the worker refuses (`decode_error`) and that leave it to crash on its next clip, as
    /// a decoder that damaged its heap on bad media without crashing at once would.
    var poisonOn: [String] = []
    /// Paths for which the worker breaks the protocol the way a compromised worker could.
    var lieOn: [String] = []
    /// Paths before whose decode two threads of the worker contend for one Swift runtime lock
    /// (a lazy global's initialisation), as a clip's reader threads do for type metadata: in a
    /// clone of the fork server that hung both threads while a thread kept the fork server's
    /// thread id (ForkServer.swift says why), so a test can show it no longer does.
    var contendOn: [String] = []
    var exitAtStart = false
    /// The fork server stops answering (blocks in `pause()`) at this fork request (1-based).
    var forkServerStallAt: Int?
    /// The fork server answers this fork request (1-based) out of turn, with another request number.
    var forkServerLieAt: Int?

    static func fromEnvironment() -> Faults {
        guard let raw = getenv(WorkerMessage.faultEnvironmentKey) else { return Faults() }
        return parse(String(cString: raw))
    }

    /// A comma-separated list of `crash-on=TEXT`, `abort-on=TEXT`, `spin-on=TEXT` (alias `hang-on=TEXT`),
    /// `sleep-on=TEXT`, `oom-on=TEXT`, `poison-on=TEXT`, `lie-on=TEXT`, `contend-on=TEXT`, `exit-at-start`,
    /// `fork-server-stall-at=N`, `fork-server-lie-at=N`. Unknown entries are ignored.
    static func parse(_ text: String) -> Faults {
        var faults = Faults()
        for item in text.split(separator: ",") {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            let key = parts[0].trimming(" ")
            let value = parts.count > 1 ? parts[1] : ""
            switch key {
            case "crash-on" where !value.isEmpty: faults.crashOn.append(value)
            case "abort-on" where !value.isEmpty: faults.abortOn.append(value)
            case "hang-on" where !value.isEmpty, "spin-on" where !value.isEmpty: faults.hangOn.append(value)
            case "sleep-on" where !value.isEmpty: faults.sleepOn.append(value)
            case "oom-on" where !value.isEmpty: faults.oomOn.append(value)
            case "poison-on" where !value.isEmpty: faults.poisonOn.append(value)
            case "lie-on" where !value.isEmpty: faults.lieOn.append(value)
            case "contend-on" where !value.isEmpty: faults.contendOn.append(value)
            case "exit-at-start": faults.exitAtStart = true
            case "fork-server-stall-at": faults.forkServerStallAt = Int(value)
            case "fork-server-lie-at": faults.forkServerLieAt = Int(value)
            default: break
            }
        }
        return faults
    }

    var isEmpty: Bool { self == Faults() }

    func lies(about path: String) -> Bool { lieOn.contains(where: { path.contains($0) }) }

    func poisons(_ path: String) -> Bool { poisonOn.contains(where: { path.contains($0) }) }

    /// Acts on a job's path: crashes, aborts, spins or sleeps; returns an `out_of_memory` failure for oom-on.
    func trigger(path: String) -> DecodeFailure? {
        if crashOn.contains(where: { path.contains($0) }) { Self.crash() }
        if abortOn.contains(where: { path.contains($0) }) {
            signal(SIGABRT, SIG_DFL)
            abort()
        }
        if hangOn.contains(where: { path.contains($0) }) {
            Self.spin()
        }
        if sleepOn.contains(where: { path.contains($0) }) {
            Self.sleepForever()
        }
        if contendOn.contains(where: { path.contains($0) }) {
            Self.contendForRuntimeLock()
        }
        if oomOn.contains(where: { path.contains($0) }) {
            let total = Self.exhaustMemory()
            return DecodeFailure(
                .outOfMemory, "\(path): out of memory (test fault oom-on) after \(total >> 20) MiB", path: path,
                detail: "allocation failed (CLIPVISOR_TEST_FAULTS)")
        }
        return nil
    }

    /// This thread starts the 200 ms initialisation of a lazy global; 20 ms later a second thread
    /// reads the same global and waits on the runtime's lock for it (`swift_once`). Returns when
    /// both have it: at once in a healthy process.
    static func contendForRuntimeLock() {
        var helper = pthread_t()
        let started = pthread_create(&helper, nil, { _ in
            usleep(20_000)
            return UnsafeMutableRawPointer(bitPattern: slowlyInitialised)
        }, nil)
        _ = slowlyInitialised
        if started == 0 { pthread_join(helper, nil) }
    }

    /// Dies of SIGSEGV, as a codec reading out of bounds does.
    static func crash() {
        signal(SIGSEGV, SIG_DFL)
        raise(SIGSEGV)
    }

    /// Busy forever, burning CPU like a codec stuck in a loop.
    static func spin() -> Never {
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        while true {
            x = x &* 6_364_136_223_846_793_005 &+ 1
            if x == 0 { print("") }  // never true; keeps the loop observable
        }
    }

    /// Blocked forever without using CPU, as a worker whose `read` waits on a stalled network or
    /// FUSE mount looks to the kernel: the supervisor can only tell it from a spin by its CPU time.
    static func sleepForever() -> Never {
        while true {
            pause()
        }
    }

    /// Allocates and touches 64 MiB chunks until an allocation fails, then frees them. Without an
    /// address-space limit it stops at 2 GiB, so a test can never take the machine down.
    static func exhaustMemory() -> Int {
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(RLIMIT_AS.rawValue), &limit)
        let cap = limit.rlim_cur == rlim_t.max ? 2 << 30 : Int.max
        let chunk = 64 << 20
        var blocks: [UnsafeMutableRawPointer] = []
        var total = 0
        while total < cap, let p = malloc(chunk) {
            memset(p, 0xA5, chunk)
            blocks.append(p)
            total += chunk
        }
        for p in blocks { free(p) }
        return total
    }
}

/// Read by `Faults.contendForRuntimeLock`: a global is initialised lazily, under the Swift
/// runtime's once-lock, on its first read in each process (a clone of the fork server included:
/// the fork server never reads it).
private let slowlyInitialised: Int = {
    usleep(200_000)
    return 1
}()
