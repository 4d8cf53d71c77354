import Shared
import SystemPackage
import Testing

@testable import Supervisor

/// `BlockSlabs` alone: when a slab may be lent, freed and closed, and what the memory limit
/// lets a block take. Against the real supervisor: BlockSlabTests.
@Suite struct BlockSlabsLedgerTests {
    let mib = 1 << 20

    /// What a worker's block leaves behind: the slab at least `bytes` long (it never shrinks).
    func fill(_ slab: BlockSlab, to bytes: Int) throws {
        _ = try [UInt8](repeating: 1, count: 1).withUnsafeBytes { try slab.fd.writeAll(toAbsoluteOffset: Int64(bytes - 1), $0) }
    }

    func isOpen(_ slab: BlockSlab) -> Bool { (try? SharedMemory.size(of: slab.fd)) != nil }

    @Test func aSlabIsLentWhenFreeAndFreedByItsWorkerItsClientOrItsConnectionsEnd() throws {
        let slabs = BlockSlabs(perConnection: 4, memoryLimit: 200 * mib)
        defer { slabs.closeAll() }
        #expect(slabs.grant(requested: 9) == 4 && slabs.grant(requested: 2) == 2 && slabs.grant(requested: -1) == 0)
        #expect(slabs.lend(to: 1, granted: 0) == nil, "a connection that asked for none gets none")

        let first = try #require(slabs.lend(to: 1, granted: 2))
        let second = try #require(slabs.lend(to: 1, granted: 2))
        #expect(first.slab.index == 0 && second.slab.index == 1)
        #expect(first.allowance == BlockSlabs.maxSlabBytes && second.allowance == BlockSlabs.maxSlabBytes)
        #expect(SharedMemory.isSealedAgainstShrinking(first.slab.fd) && !SharedMemory.isSealed(first.slab.fd))
        #expect(slabs.lend(to: 1, granted: 2) == nil, "both granted slabs are lent")

        try fill(first.slab, to: 5 * mib)
        slabs.deliver(first.slab)
        #expect(first.slab.state == .delivered && first.slab.sentToClient && first.slab.size == 5 * mib)
        slabs.takeBack(second.slab)  // its worker answered without it
        let again = try #require(slabs.lend(to: 1, granted: 2))
        #expect(again.slab === second.slab, "a free slab is lent before a new one is made")
        #expect(slabs.accountedBytes == 5 * mib + BlockSlabs.maxSlabBytes, "delivered at its size, lent at its allowance")

        #expect(throws: DecodeFailure.self) { try slabs.release([1], of: 1) }  // lent, not delivered
        #expect(throws: DecodeFailure.self) { try slabs.release([0, 5], of: 1) }  // slab 5 does not exist
        #expect(first.slab.state == .delivered, "a refused release frees nothing")
        try slabs.release([0], of: 1)
        #expect(first.slab.state == .free)
        #expect(throws: DecodeFailure.self) { try slabs.release([0], of: 1) }  // released already
        #expect(throws: DecodeFailure.self) { try slabs.release([0], of: 2) }  // another connection's

        // The connection goes while slab 1 is with a worker: slab 0 closes now, slab 1 when it
        // comes back.
        slabs.dropConnection(1)
        #expect(!isOpen(first.slab) && isOpen(second.slab) && slabs.count == 1)
        slabs.takeBack(second.slab)
        #expect(!isOpen(second.slab) && slabs.count == 0 && slabs.accountedBytes == 0)
    }

    @Test func theMemoryLimitBoundsWhatABlockMayTakeAcrossConnections() throws {
        let slabs = BlockSlabs(perConnection: 4, memoryLimit: 10 * mib)
        defer { slabs.closeAll() }
        let first = try #require(slabs.lend(to: 1, granted: 4))
        #expect(first.allowance == 10 * mib)
        #expect(slabs.lend(to: 2, granted: 4) == nil, "all 10 MiB are promised to the first block")
        try fill(first.slab, to: 3 * mib)
        slabs.deliver(first.slab)
        let other = try #require(slabs.lend(to: 2, granted: 4))
        #expect(other.allowance == 7 * mib, "what the first block did not take")
        try slabs.release([0], of: 1)
        let reused = try #require(slabs.lend(to: 1, granted: 4))
        #expect(reused.slab === first.slab && reused.allowance == 3 * mib, "a slab may always refill what it holds")
        #expect(slabs.lend(to: 1, granted: 4) == nil, "no room for another slab")
    }
}
