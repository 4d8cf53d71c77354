import CClipvisorShims
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Sealed memfds: how a block travels from the worker to the client without a copy through the
/// supervisor and without a temp file that could leak.
public enum SharedMemory {
    /// A new memfd that can be sealed; close-on-exec. Its name shows in /proc/PID/fd and helps
    /// find leaks ("memfd:clipvisor-block (deleted)").
    public static func createSealable(name: String = "clipvisor-block") throws(Errno) -> FileDescriptor {
        let fd = cv_memfd_create_sealable(name)
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        return FileDescriptor(rawValue: fd)
    }

    /// Seals against shrink, grow, write and further seals. From then on nobody, the worker
    /// included, can change what a client maps.
    public static func seal(_ fd: FileDescriptor) throws(Errno) {
        guard cv_seal_block(fd.rawValue) == 0 else { throw Errno(rawValue: errno) }
    }

    /// Seals a block slab (docs/protocol.md, "Block slabs") against shrinking and further
    /// seals: it is rewritten clip after clip, but a client's mapping of it can never fault
    /// (SIGBUS) on pages cut away, whoever else holds it.
    public static func sealAsSlab(_ fd: FileDescriptor) throws(Errno) {
        guard cv_seal_slab(fd.rawValue) == 0 else { throw Errno(rawValue: errno) }
    }

    /// Whether the fd is a memfd sealed as a slab is: against shrinking, so that a mapping of
    /// it never faults, whoever else holds it.
    public static func isSealedAgainstShrinking(_ fd: FileDescriptor) -> Bool {
        cv_seals_forbid_shrinking(cv_get_seals(fd.rawValue)) != 0
    }

    /// Whether the fd is a memfd sealed against shrink, grow and write: a reader maps only such
    /// blocks, so the bytes it validated cannot change under it (or SIGBUS it by shrinking).
    public static func isSealed(_ fd: FileDescriptor) -> Bool {
        cv_seals_are_complete(cv_get_seals(fd.rawValue)) != 0
    }

    /// Size of an open file.
    public static func size(of fd: FileDescriptor) throws(Errno) -> Int {
        var info = stat()
        guard fstat(fd.rawValue, &info) == 0 else { throw Errno(rawValue: errno) }
        return Int(info.st_size)
    }
}

/// A read-only private mapping of a whole file, unmapped when the value goes away.
public struct MappedFile: ~Copyable {
    public let bytes: UnsafeRawBufferPointer

    public init(fd: FileDescriptor) throws(Errno) {
        let size = try SharedMemory.size(of: fd)
        guard size > 0 else {
            bytes = UnsafeRawBufferPointer(start: nil, count: 0)
            return
        }
        let address = mmap(nil, size, PROT_READ, MAP_SHARED, fd.rawValue, 0)
        guard let address, address != MAP_FAILED else { throw Errno(rawValue: errno) }
        bytes = UnsafeRawBufferPointer(start: address, count: size)
    }

    deinit {
        if let base = bytes.baseAddress { munmap(UnsafeMutableRawPointer(mutating: base), bytes.count) }
    }
}
