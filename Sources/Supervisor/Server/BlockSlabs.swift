import Shared
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// One block slab (docs/protocol.md, "Block slabs"): a memfd a connection's blocks are written
/// into clip after clip, so its pages are allocated once and the client maps it once. Sealed
/// against shrinking only: it must stay writable to be reused, and a reader's mapping can
/// never fault on pages cut away.
final class BlockSlab {
    enum State: Equatable {
        /// Waiting for the next clip of its connection.
        case free
        /// With a worker writing a block into it, which may make it up to `allowance` bytes.
        case lent(allowance: Int)
        /// Holds a block its client may be reading, until the client releases it.
        case delivered
    }

    /// Its number on its connection; the client names it so.
    let index: Int
    let fd: FileDescriptor
    var state: State = .free
    /// Its size when last seen (the file grows with the largest block it held; never shrinks).
    var size = 0
    /// The client has its fd: later answers travel without one.
    var sentToClient = false

    init(index: Int, fd: FileDescriptor) {
        self.index = index
        self.fd = fd
    }
}

/// Every block slab of the service and the memory they may take. A slab is free, lent to one
/// worker, or delivered to its client, never two at once: it is lent only when free, freed
/// only when its worker answered without it or is gone (a killed worker's half-written block
/// is never delivered, and a live one never writes into a slab its client reads), and freed
/// after delivery only by its client's `release_slabs`.
final class BlockSlabs {
    /// A block larger than this never goes into a slab: slabs keep their pages for as long as
    /// their connection lives, and a rare huge clip should not pin its size there.
    static let maxSlabBytes = 64 << 20
    /// The most slabs one connection may ask for in its hello.
    static let maxPerConnection = 16
    /// No slab is lent with less room than this (the clip then gets a fresh memfd).
    static let minAllowance = 1 << 20

    /// Slabs a connection may have (`block_slabs`); 0 turns slabs off.
    let perConnection: Int
    /// Bytes all slabs may take together (`block_slab_memory`), counting a lent slab at its
    /// allowance.
    let memoryLimit: Int

    private var byConnection: [UInt64: [BlockSlab]] = [:]
    /// Lent slabs whose connection is gone: closed when their worker gives them back.
    private var orphans: [ObjectIdentifier: BlockSlab] = [:]

    init(perConnection: Int, memoryLimit: Int) {
        self.perConnection = perConnection
        self.memoryLimit = memoryLimit
    }

    /// Bytes held or promised: free and delivered slabs at their size, lent ones at their allowance.
    var accountedBytes: Int {
        var total = 0
        for slab in byConnection.values.joined() { total += Self.accounted(slab) }
        for slab in orphans.values { total += Self.accounted(slab) }
        return total
    }

    var count: Int { byConnection.values.reduce(0) { $0 + $1.count } + orphans.count }

    private static func accounted(_ slab: BlockSlab) -> Int {
        if case .lent(let allowance) = slab.state { return max(slab.size, allowance) }
        return slab.size
    }

    /// How many slabs a connection gets for the number its hello asked for.
    func grant(requested: Int) -> Int { min(max(requested, 0), perConnection) }

    func slabs(of connectionID: UInt64) -> [BlockSlab] { byConnection[connectionID] ?? [] }

    /// A slab for the next block of `connectionID` and the bytes the block may take in it: a
    /// free one, else a new one while the connection has fewer than `granted`; nil when none is
    /// free or the memory limit leaves too little room (the clip then gets a fresh memfd).
    func lend(to connectionID: UInt64, granted: Int) -> (slab: BlockSlab, allowance: Int)? {
        guard granted > 0 else { return nil }
        var list = byConnection[connectionID] ?? []
        let room = memoryLimit - accountedBytes
        if let slab = list.first(where: { $0.state == .free }) {
            let allowance = min(Self.maxSlabBytes, slab.size + max(0, room))
            guard allowance >= Self.minAllowance else { return nil }
            slab.state = .lent(allowance: allowance)
            return (slab, allowance)
        }
        let allowance = min(Self.maxSlabBytes, room)
        guard list.count < granted, allowance >= Self.minAllowance else { return nil }
        // Out of fds or memory now: this clip gets a fresh memfd, which says why if it fails too.
        guard let fd = try? SharedMemory.createSealable(name: "clipvisor-slab") else { return nil }
        do { try SharedMemory.sealAsSlab(fd) } catch {
            try? fd.close()
            return nil
        }
        let slab = BlockSlab(index: list.count, fd: fd)
        slab.state = .lent(allowance: allowance)
        list.append(slab)
        byConnection[connectionID] = list
        return (slab, allowance)
    }

    /// A worker is done with a slab: it answered without a block in it, or it is gone. The
    /// slab is free again, or closed when its connection is gone.
    func takeBack(_ slab: BlockSlab) {
        slab.size = (try? SharedMemory.size(of: slab.fd)) ?? slab.size
        slab.state = .free
        if orphans.removeValue(forKey: ObjectIdentifier(slab)) != nil { try? slab.fd.close() }
    }

    /// A block in the slab is on its way to the client (with the slab's fd, the first time).
    func deliver(_ slab: BlockSlab) {
        slab.size = (try? SharedMemory.size(of: slab.fd)) ?? slab.size
        slab.state = .delivered
        slab.sentToClient = true
    }

    /// What goes to the client with a block in `slab`: a close-on-exec duplicate of its fd when
    /// the client does not have it yet (the outbox closes what it sends). Throws when no fd is left.
    static func attachment(for slab: BlockSlab) throws(Errno) -> FileDescriptor? {
        guard !slab.sentToClient else { return nil }
        let fd = fcntl(slab.fd.rawValue, F_DUPFD_CLOEXEC, 0)
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        return FileDescriptor(rawValue: fd)
    }

    /// The client is done reading the blocks in these slabs. Checked as a whole first: a
    /// client that names a slab it does not hold has lost track of its blocks, and nothing is
    /// released.
    func release(_ indices: [Int], of connectionID: UInt64) throws(DecodeFailure) {
        let list = byConnection[connectionID] ?? []
        for index in indices {
            guard list.indices.contains(index) else {
                throw FieldReader.invalid("release_slabs", "slab \(index) does not exist on this connection (it has \(list.count))")
            }
            guard list[index].state == .delivered else {
                throw FieldReader.invalid("release_slabs", "slab \(index) holds no block delivered to this connection")
            }
        }
        for index in indices { list[index].state = .free }
    }

    /// The connection is gone: its slabs are closed, except those a worker still writes into,
    /// which are closed when the worker gives them back.
    func dropConnection(_ connectionID: UInt64) {
        for slab in byConnection.removeValue(forKey: connectionID) ?? [] {
            if case .lent = slab.state {
                orphans[ObjectIdentifier(slab)] = slab
            } else {
                try? slab.fd.close()
            }
        }
    }

    /// Closes every slab (shutdown).
    func closeAll() {
        for slab in byConnection.values.joined() { try? slab.fd.close() }
        for slab in orphans.values { try? slab.fd.close() }
        byConnection.removeAll()
        orphans.removeAll()
    }
}

/// Where a decoded clip's block is: its own sealed memfd, or its connection's slab, with a
/// duplicate of the slab's fd when the client does not have it yet.
enum DeliveredBlock {
    case memfd(FileDescriptor)
    case slab(BlockSlab, attach: FileDescriptor?)
}
