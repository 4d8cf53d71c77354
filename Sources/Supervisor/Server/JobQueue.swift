/// Clips waiting for a worker: one FIFO lane per client connection, served round-robin.
///
/// Many clients share one supervisor (8 GPUs × 8 DataLoader workers). With one global FIFO, a
/// client that sends 64-clip samples puts 64 clips ahead of everybody else's single clip; with a
/// lane per client, each dispatch takes the next clip of the next client that has work, so a
/// clip waits behind at most one clip of every other waiting client, and a sample's clips are
/// interleaved with other clients' work. Within a lane, order is kept.
///
/// Removal (a cancel, a disconnect, the queue-wait bound) is O(1): the entry stays in its lane,
/// marked stale by its absence from `lanesByJob`, and is skipped when reached.
struct JobQueue {
    struct Entry: Equatable {
        let job: JobID
        let enqueuedAt: Instant
    }

    private struct Lane {
        var entries: [Entry] = []
        var head = 0

        /// Drops consumed entries once they outweigh the live ones (amortised O(1)).
        mutating func compact() {
            if head == entries.count {
                entries.removeAll(keepingCapacity: true)
                head = 0
            } else if head > 64, head * 2 > entries.count {
                entries.removeFirst(head)
                head = 0
            }
        }
    }

    private var lanes: [UInt64: Lane] = [:]
    /// Lanes that hold waiting clips, in serving order; `cursor` is the next to serve.
    private var rotation: [UInt64] = []
    private var cursor = 0
    /// The lane of every clip still waiting.
    private var lanesByJob: [JobID: UInt64] = [:]
    /// Live entries per lane, for `depths` without walking the lanes.
    private var liveCounts: [UInt64: Int] = [:]

    /// Clips waiting.
    var count: Int { lanesByJob.count }
    var isEmpty: Bool { lanesByJob.isEmpty }

    func contains(_ job: JobID) -> Bool { lanesByJob[job] != nil }

    /// Waiting clips per client (connection id), for `status`.
    var depths: [UInt64: Int] { liveCounts }

    /// Adds a clip at the end of its client's lane.
    mutating func push(_ job: JobID, client: UInt64, at time: Instant) {
        precondition(lanesByJob[job] == nil, "job \(job) queued twice")
        lanes[client, default: Lane()].entries.append(Entry(job: job, enqueuedAt: time))
        admit(job, client: client)
    }

    /// Puts back a clip that a worker could not take (it died before taking it): first in its
    /// lane, and its lane served next, so the clip loses no place.
    mutating func pushFront(_ job: JobID, client: UInt64, enqueuedAt time: Instant) {
        precondition(lanesByJob[job] == nil, "job \(job) queued twice")
        var lane = lanes[client, default: Lane()]
        lane.entries.insert(Entry(job: job, enqueuedAt: time), at: lane.head)
        lanes[client] = lane
        admit(job, client: client)
        if let position = rotation.firstIndex(of: client) {
            cursor = position
        }
    }

    private mutating func admit(_ job: JobID, client: UInt64) {
        lanesByJob[job] = client
        liveCounts[client, default: 0] += 1
        if liveCounts[client] == 1, !rotation.contains(client) {
            // A lane that starts waiting joins just before the cursor: it is served after the
            // lanes already waiting, not ahead of them.
            rotation.insert(client, at: cursor)
            cursor += 1
            if cursor >= rotation.count { cursor = 0 }
        }
    }

    /// Takes a clip out wherever it is. False when it was not waiting.
    @discardableResult
    mutating func remove(_ job: JobID) -> Bool {
        guard let client = lanesByJob.removeValue(forKey: job) else { return false }
        liveCounts[client, default: 1] -= 1
        if liveCounts[client] == 0 { retire(client) }
        return true
    }

    /// The next clip in round-robin order across clients, removed from the queue.
    mutating func popNext() -> JobID? {
        while !rotation.isEmpty {
            if cursor >= rotation.count { cursor = 0 }
            let client = rotation[cursor]
            guard let job = takeHead(of: client) else {
                retire(client)
                continue
            }
            lanesByJob.removeValue(forKey: job)
            liveCounts[client, default: 1] -= 1
            if liveCounts[client] == 0 {
                retire(client)
            } else {
                cursor += 1
            }
            return job
        }
        return nil
    }

    /// The clip that has waited longest (for the queue-wait bound), without removing it.
    mutating func oldest() -> Entry? {
        var best: Entry?
        for client in rotation {
            guard let entry = firstLive(in: client) else { continue }
            if best == nil || entry.enqueuedAt < best!.enqueuedAt { best = entry }
        }
        return best
    }

    /// Skips stale entries at the head of a lane; returns the first live one.
    private mutating func firstLive(in client: UInt64) -> Entry? {
        guard var lane = lanes[client] else { return nil }
        defer { lanes[client] = lane }
        while lane.head < lane.entries.count {
            let entry = lane.entries[lane.head]
            if lanesByJob[entry.job] == client { return entry }
            lane.head += 1
        }
        lane.compact()
        return nil
    }

    private mutating func takeHead(of client: UInt64) -> JobID? {
        guard let entry = firstLive(in: client), var lane = lanes[client] else { return nil }
        lane.head += 1
        lane.compact()
        lanes[client] = lane
        return entry.job
    }

    /// A lane with nothing waiting leaves the rotation (and its storage goes).
    private mutating func retire(_ client: UInt64) {
        liveCounts.removeValue(forKey: client)
        lanes.removeValue(forKey: client)
        guard let position = rotation.firstIndex(of: client) else { return }
        rotation.remove(at: position)
        if position < cursor { cursor -= 1 }
        if cursor >= rotation.count { cursor = 0 }
    }
}
