import Shared
import SystemPackage
import Testing

@testable import Supervisor

/// The supervisor's bookkeeping types on their own, without processes: the queue's order and
/// fairness, the pool's census and back-off, and a sample's answers.
@Suite struct JobQueueTests {
    let t0 = Instant(nanoseconds: 1_000_000_000)

    private func drain(_ queue: inout JobQueue) -> [JobID] {
        var order: [JobID] = []
        while let job = queue.popNext() { order.append(job) }
        return order
    }

    @Test func oneClientIsServedInOrder() {
        var queue = JobQueue()
        for job in 1...5 { queue.push(JobID(job), client: 7, at: t0.adding(milliseconds: job)) }
        #expect(queue.count == 5)
        let order = drain(&queue)
        #expect(order == [1, 2, 3, 4, 5])
        #expect(queue.isEmpty && queue.depths.isEmpty)
    }

    /// A client with a 64-clip sample queued first does not hold back the single clips of
    /// clients that arrive after it: their clips come within one turn each.
    @Test func clientsAreServedRoundRobinSoABigSampleDoesNotStarveSingleClips() {
        var queue = JobQueue()
        for clip in 0..<64 { queue.push(JobID(1000 + clip), client: 1, at: t0) }
        for client in 2...9 { queue.push(JobID(client), client: UInt64(client), at: t0.adding(milliseconds: 1)) }
        let order = drain(&queue)
        #expect(order.count == 72)
        let singles = Set((2...9).map { JobID($0) })
        let lastSingle = order.lastIndex { singles.contains($0) }!
        #expect(lastSingle <= 16, "the 8 single clips alternate with the sample's clips: \(order.prefix(20))")
        #expect(order.filter { $0 >= 1000 } == (0..<64).map { JobID(1000 + $0) }, "a lane keeps its order")
    }

    @Test func aLaneThatStartsWaitingIsServedAfterTheLanesAlreadyWaiting() {
        var queue = JobQueue()
        queue.push(1, client: 1, at: t0)
        queue.push(2, client: 1, at: t0)
        queue.push(3, client: 2, at: t0)
        let first = queue.popNext()
        #expect(first == 1)
        queue.push(4, client: 3, at: t0)
        let rest = drain(&queue)
        #expect(rest == [3, 2, 4])
    }

    @Test func removedClipsAreNeverHandedOutAndCountsStayExact() {
        var queue = JobQueue()
        for job in 1...6 { queue.push(JobID(job), client: UInt64(job % 2), at: t0.adding(milliseconds: job)) }
        let removed = queue.remove(3), again = queue.remove(3), other = queue.remove(2)
        #expect(removed && other)
        #expect(!again, "a second removal is a no-op")
        #expect(queue.count == 4)
        #expect(queue.depths == [0: 2, 1: 2])
        #expect(!queue.contains(3) && queue.contains(5))
        let order = drain(&queue)
        #expect(Set(order) == [1, 4, 5, 6])
        #expect(queue.count == 0)
    }

    @Test func theOldestClipIsFoundAcrossLanesPastRemovedOnes() {
        var queue = JobQueue()
        queue.push(1, client: 1, at: t0.adding(milliseconds: 5))
        queue.push(2, client: 2, at: t0.adding(milliseconds: 1))
        queue.push(3, client: 2, at: t0.adding(milliseconds: 9))
        var oldest = queue.oldest()
        #expect(oldest?.job == 2)
        queue.remove(2)
        oldest = queue.oldest()
        #expect(oldest?.job == 1)
        queue.remove(1)
        oldest = queue.oldest()
        #expect(oldest?.job == 3)
        queue.remove(3)
        oldest = queue.oldest()
        #expect(oldest == nil)
    }

    @Test func aClipPutBackIsNextAndKeepsItsWaitingTime() {
        var queue = JobQueue()
        queue.push(1, client: 1, at: t0)
        queue.push(2, client: 2, at: t0.adding(milliseconds: 1))
        queue.push(3, client: 1, at: t0.adding(milliseconds: 2))
        let first = queue.popNext()
        #expect(first == 1)
        queue.pushFront(1, client: 1, enqueuedAt: t0)
        let oldest = queue.oldest()
        #expect(oldest == JobQueue.Entry(job: 1, enqueuedAt: t0))
        let order = drain(&queue)
        #expect(order == [1, 2, 3])
    }

    @Test func manyPushesAndPopsKeepLanesCompact() {
        var queue = JobQueue()
        var next: JobID = 1
        var served = 0
        for round in 0..<2000 {
            for client in 0..<3 {
                queue.push(next, client: UInt64(client), at: t0.adding(milliseconds: round))
                next += 1
            }
            for _ in 0..<2 where queue.popNext() != nil { served += 1 }
        }
        #expect(queue.count == 6000 - served)
        let rest = drain(&queue)
        #expect(rest.count == 6000 - served)
    }
}

@Suite struct WorkerPoolTests {
    /// A worker record over /dev/null fds: the pool only keeps the books, it never signals here.
    private func worker(_ id: UInt64, _ state: WorkerProcess.State) throws -> WorkerProcess {
        let null = try FileDescriptor.open("/dev/null", .readOnly)
        let worker = WorkerProcess(id: id, pid: 0, pidfd: null, control: null, startDeadline: Instant.now())
        worker.state = state
        return worker
    }

    @Test func theCensusCountsEveryStateOnce() throws {
        let pool = WorkerPool()
        let now = Instant.now()
        pool.insert(try worker(1, .starting(deadline: now)))
        pool.insert(try worker(2, .idle))
        pool.insert(try worker(3, .busy(job: 9, deadline: now)))
        pool.insert(try worker(4, .retiring))
        pool.insert(try worker(5, .killed(reason: "deadline", at: now)))
        pool.insert(try worker(6, .idle))
        let census = pool.census
        #expect(census == WorkerPool.Census(starting: 1, idle: 2, busy: 1, retiring: 1, killed: 1))
        #expect(census.live == 4 && census.ready == 3)
        #expect(pool.idle.map(\.id) == [2, 6])
        #expect(pool.spawnsNeeded(target: 6, now: now) == 2)
        #expect(pool.isWarm(target: 3) && !pool.isWarm(target: 4))
    }

    @Test func startFailuresBackOffAndRefuseClipsOnlyWhenNothingIsReady() throws {
        let pool = WorkerPool()
        let now = Instant.now()
        #expect(pool.noteStartFailure("exit 71", now: now) == 100)
        #expect(pool.noteStartFailure("exit 71", now: now) == 200)
        #expect(pool.spawnsNeeded(target: 2, now: now) == 0, "no spawn during the back-off")
        #expect(pool.spawnsNeeded(target: 2, now: now.adding(milliseconds: 200)) == 2)
        #expect(!pool.cannotStartAny)
        pool.noteStartFailure("exit 71", now: now)
        #expect(pool.cannotStartAny && pool.lastStartError == "exit 71")
        for _ in 0..<20 { pool.noteStartFailure("exit 71", now: now) }
        #expect(pool.nextSpawnAllowed == now.adding(milliseconds: 30_000), "the back-off is capped")
        pool.insert(try worker(1, .idle))
        #expect(!pool.cannotStartAny, "a ready worker serves")
        #expect(pool.isWarm(target: 4), "a degraded pool still serves")
        pool.noteReady()
        #expect(pool.consecutiveStartFailures == 0 && pool.spawnsNeeded(target: 2, now: now) == 1)
    }
}

@Suite struct SampleStateTests {
    private func failure(_ reason: SkipReason) -> DecodeFailure { DecodeFailure(reason, "/x.mp4: \(reason)", path: "/x.mp4") }

    @Test func allSucceedingClipsEndWithOneDone() {
        let sample = SampleState(requestID: 3, allOrNothing: true, jobs: [10, 11, 12])
        #expect(sample.record(clip: 1, failure: nil).done == nil)
        #expect(sample.record(clip: 0, failure: nil).done == nil)
        let last = sample.record(clip: 2, failure: nil)
        #expect(last.done == ["id": 3, "done": true, "clips": 3, "ok": true])
        #expect(sample.record(clip: 2, failure: nil).done == nil, "done goes out once")
    }

    @Test func allOrNothingCancelsTheUnansweredAndNamesTheFirstFailure() {
        let sample = SampleState(requestID: 4, allOrNothing: true, jobs: [20, 21, 22, 23])
        _ = sample.record(clip: 0, failure: nil)
        let failed = sample.record(clip: 2, failure: failure(.timeout))
        #expect(failed.cancel == [21, 23])
        #expect(failed.cancelMessage?("/y.mp4") == "/y.mp4: cancelled because clip 2 of the sample failed (timeout)")
        #expect(sample.record(clip: 1, failure: failure(.cancelled)).cancel.isEmpty, "only the first failure cancels")
        let done = sample.record(clip: 3, failure: failure(.cancelled)).done
        #expect(done?["ok"] == false && done?["clip"] == 2)
        #expect(done?["error"]?["message"]?.stringValue == "clip 2: /x.mp4: timeout")
    }

    @Test func withoutAllOrNothingNothingIsCancelledButTheSampleStillFails() {
        let sample = SampleState(requestID: 5, allOrNothing: false, jobs: [30, 31])
        let failed = sample.record(clip: 0, failure: failure(.decodeError))
        #expect(failed.cancel.isEmpty && failed.cancelMessage == nil)
        let done = sample.record(clip: 1, failure: nil).done
        #expect(done?["ok"] == false && done?["clip"] == 0 && done?["error"]?["reason"] == "decode_error")
    }

    @Test func anUnknownClipIndexChangesNothing() {
        let sample = SampleState(requestID: 6, allOrNothing: true, jobs: [40])
        #expect(sample.record(clip: 5, failure: failure(.crashed)).cancel.isEmpty)
        #expect(!sample.isComplete)
    }
}
