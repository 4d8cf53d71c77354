import CClipvisorShims
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// What an epoll registration stands for. The id is never reused, so an event that arrives
/// for an object already gone finds nothing and is dropped instead of hitting a newer object
/// that happens to have the same fd number.
enum EventSource: Hashable, Sendable {
    case listener
    case signals
    case connection(UInt64)
    case workerControl(UInt64)
    case workerExit(UInt64)
    /// The fork server's pidfd and channel (the id counts its starts).
    case forkServerExit(UInt64)
    case forkServerControl(UInt64)

    var token: UInt64 {
        switch self {
        case .listener: 1 << 56
        case .signals: 2 << 56
        case .connection(let id): 3 << 56 | id
        case .workerControl(let id): 4 << 56 | id
        case .workerExit(let id): 5 << 56 | id
        case .forkServerExit(let id): 6 << 56 | id
        case .forkServerControl(let id): 7 << 56 | id
        }
    }

    init?(token: UInt64) {
        let id = token & ((1 << 56) - 1)
        switch token >> 56 {
        case 1: self = .listener
        case 2: self = .signals
        case 3: self = .connection(id)
        case 4: self = .workerControl(id)
        case 5: self = .workerExit(id)
        case 6: self = .forkServerExit(id)
        case 7: self = .forkServerControl(id)
        default: return nil
        }
    }
}

/// A thin owner of an epoll instance: the supervisor's one event loop waits here.
final class Poller {
    struct Event {
        var source: EventSource
        var readable: Bool
        var writable: Bool
        /// Hang-up or error: the peer is gone.
        var closed: Bool
    }

    private let epoll: FileDescriptor

    init() throws(Errno) {
        let fd = cv_epoll_create()
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        epoll = FileDescriptor(rawValue: fd)
    }

    deinit { try? epoll.close() }

    func add(_ fd: FileDescriptor, _ source: EventSource, writable: Bool = false) throws(Errno) {
        try control(CV_EPOLL_ADD, fd, source, writable: writable, readable: true)
    }

    /// Changes what is watched; `readable: false` stops input events (hang-ups still come).
    func modify(_ fd: FileDescriptor, _ source: EventSource, writable: Bool, readable: Bool = true) throws(Errno) {
        try control(CV_EPOLL_MODIFY, fd, source, writable: writable, readable: readable)
    }

    /// Unregisters before the fd is closed (closing alone would leave duplicated fds registered).
    func remove(_ fd: FileDescriptor) {
        _ = cv_epoll_ctl(epoll.rawValue, CV_EPOLL_REMOVE, fd.rawValue, 0, 0)
    }

    private func control(_ op: cv_epoll_op, _ fd: FileDescriptor, _ source: EventSource, writable: Bool, readable: Bool) throws(Errno) {
        var interest: Int32 = 0
        if writable { interest |= Int32(CV_INTEREST_WRITE) }
        if !readable { interest |= Int32(CV_INTEREST_NO_READ) }
        guard cv_epoll_ctl(epoll.rawValue, op, fd.rawValue, interest, source.token) == 0 else {
            throw Errno(rawValue: errno)
        }
    }

    /// Waits up to `timeoutMs` (−1: forever). EINTR yields no events.
    func wait(timeoutMs: Int32) throws(Errno) -> [Event] {
        var tokens = [UInt64](repeating: 0, count: 64)
        var flags = [UInt32](repeating: 0, count: 64)
        let n = cv_epoll_wait(epoll.rawValue, &tokens, &flags, 64, timeoutMs)
        if n < 0 {
            let error = Errno(rawValue: errno)
            if error == .interrupted { return [] }
            throw error
        }
        var events: [Event] = []
        events.reserveCapacity(Int(n))
        for i in 0..<Int(n) {
            guard let source = EventSource(token: tokens[i]) else { continue }
            let f = flags[i]
            events.append(Event(
                source: source,
                readable: f & UInt32(CV_EVENT_READABLE) != 0,
                writable: f & UInt32(CV_EVENT_WRITABLE) != 0,
                closed: f & UInt32(CV_EVENT_CLOSED) != 0))
        }
        return events
    }
}

/// Monotonic time in nanoseconds: deadlines must not move when the wall clock does.
struct Instant: Comparable, Sendable {
    var nanoseconds: UInt64

    static func now() -> Instant {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Instant(nanoseconds: UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec))
    }

    static func < (a: Instant, b: Instant) -> Bool { a.nanoseconds < b.nanoseconds }

    func adding(milliseconds: Int) -> Instant {
        Instant(nanoseconds: nanoseconds &+ UInt64(max(0, milliseconds)) * 1_000_000)
    }

    /// Milliseconds from `earlier` to this instant (0 if `earlier` is later).
    func milliseconds(since earlier: Instant) -> Int {
        nanoseconds > earlier.nanoseconds ? Int((nanoseconds - earlier.nanoseconds) / 1_000_000) : 0
    }
}
