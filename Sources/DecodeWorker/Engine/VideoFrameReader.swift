import CFFmpeg
import Shared

/// How frames are reached.
enum AccessPolicy: String, Sendable, CaseIterable {
    /// Seek when a keyframe lies far enough ahead of the decode position, else decode on.
    case auto
    /// Decode every frame from the start up to the last wanted one.
    case sequential
    /// Seek to the keyframe before every wanted frame that has a keyframe ahead of the position.
    case seek
}

/// Decodes the wanted frames of one video stream, exactly, by sequential decoding or by seeking.
///
/// Every packet sent to the decoder gets its decode-order ordinal as pts; the decoder carries it
/// through reordering, so each output frame names the packet it came from and thus its
/// presentation index in the `FrameTable` — exact even with B-frames and duplicate timestamps.
/// A seek goes to the keyframe before a target (from the table), re-identifies the first packet
/// read by (position, dts, pts), and decodes forward. Seeking is trusted only when clean: if it
/// lands wrong or the decoder logs an error after it, the remaining frames are decoded
/// sequentially from the start, which is the ground truth. So both ways give the same bytes.
final class VideoFrameReader {
    struct Outcome {
        var usedSeek = false
        /// Wanted presentation indices that no decoded frame matched.
        var missing: [Int] = []
        /// FFmpeg error lines logged while decoding frames that were returned (or before them).
        var errors: [String] = []
        /// Returned frames the decoder flagged as concealed.
        var corruptFrames = 0
        /// The demuxer stopped with an error while decoding.
        var readError: String?
        var notes: [String] = []
    }

    /// A frame converted to output bytes.
    typealias Deliver = (_ index: Int, _ bytes: [UInt8], _ corrupt: Bool) throws(DecodeFailure) -> Void

    private let reopen: () throws(DecodeFailure) -> Demuxer
    private var demuxer: Demuxer
    private let streamIndex: Int
    private let table: FrameTable
    private let threads: Int
    private let maxPixels: Int
    private let path: String
    private let converter: FrameConverter
    private let buffers: FrameBuffers
    /// Wanted frames are converted and delivered on a thread of their own (`ConversionStage`).
    private let convertsOnItsOwnThread: Bool
    private var decoder: Decoder
    private let packet: Packet
    private let frame: Frame
    /// Ordinal of the next packet the demuxer returns, when known.
    private var nextOrdinal: Int?
    private var atEOF = false
    private var outcome = Outcome()
    /// Untimed streams: presentation index of the next frame the decoder outputs.
    private var outputCounter = 0
    /// Frames received after a later one, before a wanted one is declared missing.
    private let reorderSlack: Int
    /// A keyframe must be at least this many packets ahead for `auto` to seek to it.
    static let seekThreshold = 32

    init(
        demuxer: Demuxer, reopen: @escaping () throws(DecodeFailure) -> Demuxer, streamIndex: Int, table: FrameTable,
        threads: Int, maxPixels: Int, converter: FrameConverter, buffers: FrameBuffers, path: String,
        convertsOnItsOwnThread: Bool = false
    ) throws(DecodeFailure) {
        self.convertsOnItsOwnThread = convertsOnItsOwnThread
        self.demuxer = demuxer
        self.reopen = reopen
        self.streamIndex = streamIndex
        self.table = table
        self.threads = threads
        self.maxPixels = maxPixels
        self.converter = converter
        self.buffers = buffers
        self.path = path
        decoder = try Decoder(stream: demuxer.stream(streamIndex), media: .video(maxPixels: maxPixels), threads: threads, path: path)
        packet = try Packet()
        frame = try Frame()
        reorderSlack = 16 + max(threads, 1) + 2 * Int(demuxer.stream(streamIndex).pointee.codecpar.pointee.video_delay)
    }

    /// One continuous stretch of decoding: where it starts (a keyframe ordinal to seek to, or
    /// the start of the stream) and the wanted frames it should produce.
    struct Segment: Equatable {
        var seekTo: Int?
        var targets: [Int]
    }

    /// Splits the wanted frames (ascending presentation indices) into segments.
    static func plan(_ wanted: [Int], table: FrameTable, policy: AccessPolicy) -> [Segment] {
        guard !wanted.isEmpty else { return [] }
        guard policy != .sequential, table.timed, table.packetByKey != nil else {
            return [Segment(seekTo: nil, targets: wanted)]
        }
        var segments: [Segment] = []
        var lastOrdinal = -1
        for index in wanted {
            let ordinal = table.presented[index]
            let sync = table.syncPoint(for: index)
            if segments.isEmpty {
                var seek: Int? = nil
                if let sync, sync > 0, policy == .seek || sync > seekThreshold { seek = sync }
                segments.append(Segment(seekTo: seek, targets: [index]))
            } else if let sync, sync > lastOrdinal, policy == .seek || sync - lastOrdinal > seekThreshold {
                segments.append(Segment(seekTo: sync, targets: [index]))
            } else {
                segments[segments.count - 1].targets.append(index)
            }
            lastOrdinal = max(lastOrdinal, ordinal)
        }
        return segments
    }

    /// Decodes `wanted` (ascending, unique presentation indices) and hands each frame to
    /// `deliver` (not necessarily in order).
    func run(wanted: [Int], policy: AccessPolicy, deliver: Deliver) throws(DecodeFailure) -> Outcome {
        var remaining = Set(wanted)
        var positionedAtStart = false
        var fellBack = false
        for segment in Self.plan(wanted, table: table, policy: policy) {
            let targets = segment.targets.filter { remaining.contains($0) }
            if targets.isEmpty { continue }
            if let keyframe = segment.seekTo {
                if let frames = try seekRun(keyframe: keyframe, targets: targets) {
                    outcome.usedSeek = true
                    for (index, item) in frames {
                        try deliver(index, item.bytes, item.corrupt)
                        if item.corrupt { outcome.corruptFrames += 1 }
                        remaining.remove(index)
                    }
                    continue
                }
                fellBack = true
                break
            }
            if !positionedAtStart {
                try rewind()
                positionedAtStart = true
            }
            let found = try sequentialRun(targets: targets, deliver: deliver)
            remaining.subtract(found)
            remaining.subtract(targets)  // the rest are missing; recorded by sequentialRun
        }
        if fellBack {
            outcome.notes.append("seeking was not exact for this file; decoded sequentially from the start")
            try rewind()
            let rest = wanted.filter { remaining.contains($0) }
            _ = try sequentialRun(targets: rest, deliver: deliver)
        }
        outcome.missing.sort()
        return outcome
    }

    // MARK: - Positioning

    /// Back to the first packet: a seek verified by the first packet's identity, else a reopen.
    private func rewind() throws(DecodeFailure) {
        atEOF = false
        outputCounter = 0
        if !table.packets.isEmpty, let keys = table.packetByKey {
            let first = table.packets[0]
            let sought: Bool =
                if let ts = first.dts ?? first.pts { demuxer.seek(stream: streamIndex, to: ts) }
                else if first.position >= 0 { demuxer.seek(bytePosition: first.position) }
                else { false }
            if sought {
                decoder.flush()
                if case .packet = readVideoPacket(), keys[FrameTable.key(of: packet)] == 0 {
                    nextOrdinal = 0
                    pendingPacket = true
                    return
                }
            }
        }
        demuxer = try reopen()
        demuxer.discardAll(except: [streamIndex])
        decoder = try Decoder(stream: demuxer.stream(streamIndex), media: .video(maxPixels: maxPixels), threads: threads, path: path)
        nextOrdinal = 0
        pendingPacket = false
    }

    /// Whether `packet` holds a packet read but not yet sent.
    private var pendingPacket = false

    /// Reads the next non-empty packet of the video stream into `packet`.
    private func readVideoPacket() -> Demuxer.ReadResult {
        while true {
            let result = demuxer.read(into: packet)
            guard case .packet = result else { return result }
            if packet.streamIndex == streamIndex, packet.size > 0 { return .packet }
        }
    }

    // MARK: - Runs

    private struct Converted {
        var bytes: [UInt8]
        var corrupt: Bool
    }

    /// Seeks to `keyframe` and decodes `targets`; nil when the seek was not exact (landed
    /// elsewhere, a target did not appear, or the decoder logged an error).
    private func seekRun(keyframe start: Int, targets: [Int]) throws(DecodeFailure) -> [Int: Converted]? {
        guard let keys = table.packetByKey else { return nil }
        guard let landed = try positionAtKeyframe(start, keys: keys) else { return nil }
        nextOrdinal = landed
        pendingPacket = true
        let mark = FFLog.mark()
        var collected: [Int: Converted] = [:]
        let result = try decodeLoop(targets: targets, verifying: keys) { index, bytes, corrupt throws(DecodeFailure) in
            collected[index] = Converted(bytes: bytes, corrupt: corrupt)
        }
        if result.lostTrack || !result.missing.isEmpty || FFLog.errorCount(since: mark) > 0 || result.readError != nil {
            return nil
        }
        return collected
    }

    /// Seeks so that the next packet read is keyframe `target` (or, failing that, a keyframe
    /// before it), and returns the ordinal of that packet, already read into `packet`.
    /// Demuxers compare the timestamp with different clocks (MP4: index times shifted by the edit
    /// list), so the keyframe's pts and then its dts are tried; landing after the keyframe moves
    /// to the keyframe before; landing before it is accepted (correct, only slower).
    private func positionAtKeyframe(_ target: Int, keys: [FrameTable.PacketKey: Int]) throws(DecodeFailure) -> Int? {
        var keyframe = target
        for _ in 0..<4 {
            let info = table.packets[keyframe]
            var stamps: [Int64] = []
            for t in [info.pts, info.dts] { if let t, !stamps.contains(t) { stamps.append(t) } }
            var early: Int?
            var late = false
            for ts in stamps {
                guard demuxer.seek(stream: streamIndex, to: ts) else { continue }
                decoder.flush()
                atEOF = false
                guard case .packet = readVideoPacket(), let ordinal = keys[FrameTable.key(of: packet)] else { continue }
                if ordinal == keyframe { return ordinal }
                if ordinal > keyframe { late = true; continue }
                early = max(early ?? ordinal, ordinal)
            }
            if let early, !late || early > 0 {
                // Re-seek to the best early landing and skip to its first keyframe packet.
                let info = table.packets[early]
                guard let ts = info.pts ?? info.dts, demuxer.seek(stream: streamIndex, to: ts) else { return nil }
                decoder.flush()
                atEOF = false
                guard case .packet = readVideoPacket(), var ordinal = keys[FrameTable.key(of: packet)], ordinal <= keyframe
                else { return nil }
                while !table.packets[ordinal].isKey {
                    guard case .packet = readVideoPacket(), let next = keys[FrameTable.key(of: packet)] else { return nil }
                    ordinal = next
                }
                return ordinal
            }
            guard late, let earlier = table.keyframe(before: keyframe) else { return nil }
            keyframe = earlier
        }
        return nil
    }

    /// Decodes forward from the current position; wanted frames go straight to `deliver`.
    /// Errors and missing frames are recorded in the outcome.
    private func sequentialRun(targets: [Int], deliver: Deliver) throws(DecodeFailure) -> Set<Int> {
        let mark = FFLog.mark()
        var found = Set<Int>()
        let result = try decodeLoop(targets: targets) { index, bytes, corrupt throws(DecodeFailure) in
            found.insert(index)
            if corrupt { outcome.corruptFrames += 1 }
            try deliver(index, bytes, corrupt)
        }
        outcome.missing.append(contentsOf: result.missing)
        for line in FFLog.errors(since: mark) where !outcome.errors.contains(line) { outcome.errors.append(line) }
        if let e = result.readError { outcome.readError = e }
        return found
    }

    private struct LoopResult {
        var missing: [Int] = []
        var readError: String?
        /// After a seek, a packet was not the one the frame table lists next (MPEG-PS, for one,
        /// inserts a packet of its own after a seek): ordinals would be off from there on.
        var lostTrack = false
    }

    /// The packet/frame loop: feeds packets from the current position until every target is
    /// produced or known missing, and hands each target to `store` converted, on this thread or,
    /// with `convertsOnItsOwnThread`, on a `ConversionStage` that is done before this returns.
    /// With `verifying`, every packet read must be the one the frame table lists next (checked
    /// by its identity), else the loop stops with `lostTrack`: after a seek, counting packets
    /// alone could label every later frame with its neighbour's index.
    private func decodeLoop(
        targets: [Int], verifying keys: [FrameTable.PacketKey: Int]? = nil, store: Deliver
    ) throws(DecodeFailure) -> LoopResult {
        guard convertsOnItsOwnThread else {
            return try decodeFrames(targets: targets, verifying: keys) { index, corrupt throws(DecodeFailure) in
                try store(index, try converted(frame), corrupt)
            }
        }
        let outcome = withoutActuallyEscaping(store) { store in
            Result { () throws(DecodeFailure) -> LoopResult in
                let size = demuxer.stream(streamIndex).pointee.codecpar.pointee
                let depth = ConversionStage.depth(frameBytes: ConversionStage.frameBytes(
                    width: Int(size.width), height: Int(size.height), format: AVPixelFormat(rawValue: size.format)))
                let stage = ConversionStage(depth: depth) { index, frame, corrupt throws(DecodeFailure) in
                    try store(index, try self.converted(frame), corrupt)
                }
                do throws(DecodeFailure) {
                    let result = try decodeFrames(targets: targets, verifying: keys) { index, corrupt throws(DecodeFailure) in
                        try stage.submit(index, try frame.reference(path: path), corrupt: corrupt)
                    }
                    try stage.finish()
                    return result
                } catch {
                    stage.abandon()
                    throw error
                }
            }
        }
        return try outcome.get()
    }

    /// `frame` converted into a buffer of `buffers`.
    private func converted(_ frame: Frame) throws(DecodeFailure) -> [UInt8] {
        var bytes = buffers.take()
        var failure: DecodeFailure?
        bytes.withUnsafeMutableBytes { raw in
            do throws(DecodeFailure) {
                try converter.convert(frame, into: raw, path: path)
            } catch {
                failure = error
            }
        }
        if let failure {
            buffers.give(bytes)
            throw failure
        }
        return bytes
    }

    /// `decodeLoop` without the conversion: `hand` takes each wanted frame (in `frame`, valid
    /// until `hand` returns) the first time it comes out of the decoder.
    private func decodeFrames(
        targets: [Int], verifying keys: [FrameTable.PacketKey: Int]?,
        hand: (_ index: Int, _ corrupt: Bool) throws(DecodeFailure) -> Void
    ) throws(DecodeFailure) -> LoopResult {
        let pending = targets.sorted()
        var head = 0
        var filled = Set<Int>()
        var passedBy: [Int: Int] = [:]
        var result = LoopResult()
        let wanted = Set(targets)
        // skip_frame is read when a packet is decoded; with frame threads that happens later,
        // on a copy of the context, so skipping is used with one decoder thread only.
        let skipUnwanted = table.timed && decoder.context.pointee.thread_count == 1

        func advanceHead() {
            while head < pending.count, filled.contains(pending[head]) { head += 1 }
        }

        // Handles one decoded frame; returns true when every target is resolved.
        func take() throws(DecodeFailure) -> Bool {
            let index: Int?
            if table.timed {
                if let ordinal = frame.anyPts, ordinal >= 0, ordinal < Int64(table.packets.count) {
                    index = table.presentationIndexOfPacket[Int(ordinal)]
                } else {
                    index = nil
                }
            } else {
                index = outputCounter < table.count ? outputCounter : nil
                outputCounter += 1
            }
            guard let index else { return head >= pending.count }
            if wanted.contains(index), !filled.contains(index) {
                try hand(index, frame.isCorrupt)
                filled.insert(index)
                advanceHead()
            }
            // A wanted frame that many later frames have overtaken is not coming.
            var i = head
            while i < pending.count, pending[i] < index {
                let target = pending[i]
                if !filled.contains(target) {
                    passedBy[target, default: 0] += 1
                    if passedBy[target]! > reorderSlack {
                        filled.insert(target)
                        result.missing.append(target)
                    }
                }
                i += 1
            }
            advanceHead()
            return head >= pending.count
        }

        func drain() throws(DecodeFailure) -> Bool {
            while true {
                frame.unref()
                let rc = decoder.receive(into: frame)
                if rc == CFFMPEG_AVERROR_EAGAIN || rc == CFFMPEG_AVERROR_EOF { return false }
                if rc < 0 {
                    if rc == CFFMPEG_AVERROR_ENOMEM { throw FFError.failure(rc, "decoding", path: path) }
                    // A decode error: FFmpeg logged it; carry on with the next packet.
                    FFLogNote.record(rc)
                    return false
                }
                if try take() { return true }
            }
        }

        advanceHead()
        if head >= pending.count { return result }
        if atEOF {
            for t in pending[head...] where !filled.contains(t) { result.missing.append(t) }
            return result
        }
        while true {
            if !pendingPacket {
                let read = readVideoPacket()
                if case .packet = read {} else {
                    if case .error(let code) = read { result.readError = FFError.text(code) }
                    atEOF = true
                    _ = decoder.send(nil)
                    _ = try drain()
                    for t in pending[head...] where !filled.contains(t) { result.missing.append(t) }
                    return result
                }
            }
            let ordinal = nextOrdinal ?? 0
            // The first packet after a seek was identified when positioning.
            if let keys, !pendingPacket, keys[FrameTable.key(of: packet)] != ordinal {
                result.lostTrack = true
                return result
            }
            pendingPacket = false
            nextOrdinal = ordinal + 1
            packet.pointer.pointee.pts = Int64(ordinal)
            packet.pointer.pointee.dts = Int64(ordinal)
            if skipUnwanted {
                // A frame nobody wants and no other frame references need not be decoded
                // (a third of an H.264 stream's frames, typically). Only with timed packets:
                // untimed streams identify frames by counting outputs.
                let index = ordinal < table.presentationIndexOfPacket.count ? table.presentationIndexOfPacket[ordinal] : nil
                decoder.skipNonReferenceFrames(index.map { !wanted.contains($0) } ?? false)
            }
            var rc = decoder.send(packet)
            while rc == CFFMPEG_AVERROR_EAGAIN {
                if try drain() { return result }
                rc = decoder.send(packet)
            }
            if rc < 0 {
                if rc == CFFMPEG_AVERROR_ENOMEM { throw FFError.failure(rc, "decoding", path: path) }
                FFLogNote.record(rc)
            }
            if try drain() { return result }
        }
    }
}

/// Decoder return codes that FFmpeg did not also log: recorded as log lines so that they reach
/// `partial_detail` like any other error.
enum FFLogNote {
    static func record(_ code: Int32) {
        cffmpeg_log(nil, AV_LOG_ERROR, "decoder: \(FFError.text(code))")
    }
}
