import CFFmpeg
import Shared

/// Every frame of the video stream, in presentation order, with its time — built by demuxing
/// the packets of that stream without decoding them.
///
/// Why packets rather than the container's index: MP4's index holds decode timestamps (not
/// presentation times) and counts edit-list preroll; Matroska's cues list keyframes only; raw
/// streams have none. A packet pass is exact for all of them and costs a read of the file.
///
/// Presentation order is the packets sorted by pts (stable, so duplicate pts from concatenated
/// clips keep their decode order). Edit-list preroll (`AV_PKT_FLAG_DISCARD`), empty packets and
/// invisible VP8 frames are decoded but never presented. A stream in which some packet has no
/// pts (raw H.264) is *untimed*: its frames are presented in the decoder's output order and
/// timed at `index / avg_fps`.
struct FrameTable {
    /// One packet of the video stream, in decode (demux) order.
    struct PacketInfo: Equatable {
        var pts: Int64?
        var dts: Int64?
        var position: Int64
        var duration: Int64
        var isKey: Bool
        /// Decoded but never shown (edit-list preroll, invisible frame).
        var hidden: Bool
    }

    /// Identifies a packet read again after a seek.
    struct PacketKey: Hashable {
        var position: Int64
        var dts: Int64
        var pts: Int64
    }

    var packets: [PacketInfo] = []
    /// Some packet carried palette side data (paletted video: pal8 rawvideo, QuickTime RLE...).
    var carriesPalette = false
    /// Presentation index → packet ordinal.
    var presented: [Int] = []
    /// Packet ordinal → presentation index (nil for hidden packets). Only for timed tables.
    var presentationIndexOfPacket: [Int?] = []
    /// Seconds from the first presented frame, by presentation index.
    var times: [Double] = []
    /// Whether every presented packet has a pts (else times are `index / avgFps`).
    var timed = true
    var timeBase = AVRational(num: 1, den: 1)
    /// pts (stream time base) of the first presented frame: the origin of every returned time.
    var originTicks: Int64 = 0
    /// Untimed (no pts), with times taken from the packets' increasing dts.
    var timesFromDecodingOrder = false
    /// Frame times are the container's, not index / rate.
    var hasTimes: Bool { timed || timesFromDecodingOrder }
    /// The stream's average frame rate, as Qwen's rule and decord use it.
    var avgFps = 0.0
    /// Seconds: the end of the last frame (its pts plus its duration).
    var endTime = 0.0
    /// Packet ordinals of keyframes, ascending.
    var keyframes: [Int] = []
    /// Lookup for re-identifying packets after a seek; nil when keys collide (then no seeking).
    var packetByKey: [PacketKey: Int]? = [:]
    /// The demuxer stopped with an error before the end of the file (FFmpeg's message).
    var readError: String?
    var hiddenCount = 0
    /// Packets before the first keyframe (hidden: no decoder outputs them).
    var leadingUndecodable = 0
    var encrypted = false
    /// `nb_frames` from the container, when it gives one.
    var containerFrames: Int?

    var count: Int { presented.count }

    /// Reads every packet of `streamIndex` from the demuxer's current position to the end.
    ///
    /// With `originOnly` it stops as soon as the time origin (`originTicks`) is certain: once a
    /// packet's dts reaches the smallest pts of the presented packets so far, since no later packet
    /// can be presented before it is decoded (pts ≥ dts). The audio path uses this when the video
    /// itself is not wanted; the table is then incomplete and good for nothing else.
    static func scan(_ demuxer: Demuxer, streamIndex: Int, originOnly: Bool = false) throws(DecodeFailure) -> FrameTable {
        let st = demuxer.stream(streamIndex)
        var table = FrameTable()
        table.timeBase = st.pointee.time_base
        let nb = st.pointee.nb_frames
        table.containerFrames = nb > 0 ? Int(nb) : nil
        let isVP8 = st.pointee.codecpar.pointee.codec_id == AV_CODEC_ID_VP8
        demuxer.discardAll(except: [streamIndex])
        let packet = try Packet()
        var seenKey = false
        var earliest: Int64?
        loop: while true {
            switch demuxer.read(into: packet) {
            case .endOfFile: break loop
            case .error(let code):
                table.readError = FFError.text(code)
                break loop
            case .packet:
                guard packet.streamIndex == streamIndex, packet.size > 0 else { continue }
                if packet.isEncrypted { table.encrypted = true }
                if packet.carriesPalette { table.carriesPalette = true }
                // VP8: bit 4 of the first byte is show_frame; alt-ref frames are decoded, not shown.
                let invisible = isVP8 && (packet.firstByte.map { $0 & 0x10 == 0 } ?? false)
                table.packets.append(
                    PacketInfo(
                        pts: packet.pts, dts: packet.dts, position: packet.position, duration: packet.duration,
                        isKey: packet.isKey, hidden: packet.isDiscard || invisible))
                if originOnly {
                    if seenKey || packet.isKey, !packet.isDiscard, !invisible, let pts = packet.pts {
                        earliest = min(earliest ?? pts, pts)
                    }
                    seenKey = seenKey || packet.isKey
                    if let earliest, let dts = packet.dts, dts >= earliest { break loop }
                }
            }
        }
        table.finish(stream: st)
        return table
    }

    /// Builds the presentation order and times from `packets`.
    mutating func finish(stream st: UnsafeMutablePointer<AVStream>?) {
        // Packets before the first keyframe cannot be decoded (a stream cut mid-GOP, a lost IDR):
        // decoders drop them, so they are not frames of the video.
        if let firstKey = packets.firstIndex(where: \.isKey), firstKey > 0 {
            for i in 0..<firstKey where !packets[i].hidden {
                packets[i].hidden = true
                leadingUndecodable += 1
            }
        }
        let shown = packets.indices.filter { !packets[$0].hidden }
        hiddenCount = packets.count - shown.count
        timed = !shown.isEmpty && shown.allSatisfy { packets[$0].pts != nil }
        avgFps = Self.averageRate(st)
        keyframes = packets.indices.filter { packets[$0].isKey }
        presentationIndexOfPacket = Array(repeating: nil, count: packets.count)
        if timed {
            presented = shown.sorted { a, b in
                let pa = packets[a].pts!, pb = packets[b].pts!
                return pa != pb ? pa < pb : a < b
            }
            for (index, ordinal) in presented.enumerated() { presentationIndexOfPacket[ordinal] = index }
            originTicks = presented.first.map { packets[$0].pts! } ?? 0
            let (num, den) = (Double(timeBase.num), Double(timeBase.den))
            times = presented.map { Double(packets[$0].pts! - originTicks) * num / den }
            if avgFps <= 0, times.count > 1, let last = times.last, last > 0 {
                avgFps = Double(times.count - 1) / last
            }
        } else {
            presented = shown
            originTicks = 0
            // No pts but increasing dts on every shown packet (H.264 copied into AVI): decoding
            // times, in order, are the presentation times of the frames in presentation order
            // (a constant reorder delay aside). The container's average rate is unreliable
            // for such streams (FFmpeg reports AVI's B-frame H.264 at twice its rate).
            let stamps = shown.compactMap { packets[$0].dts }
            if stamps.count == shown.count, stamps.count > 1, zip(stamps, stamps.dropFirst()).allSatisfy({ $0 < $1 }) {
                timesFromDecodingOrder = true
                originTicks = stamps[0]
                let (num, den) = (Double(timeBase.num), Double(timeBase.den))
                times = stamps.map { Double($0 - stamps[0]) * num / den }
                if let last = times.last, last > 0 { avgFps = Double(times.count - 1) / last }
            }
        }
        if avgFps <= 0 || !avgFps.isFinite { avgFps = 25 }
        if !timed, !timesFromDecodingOrder { times = presented.indices.map { Double($0) / avgFps } }
        if let lastIndex = presented.last, let lastTime = times.last {
            let tb = Double(timeBase.num) / Double(timeBase.den)
            let d = packets[lastIndex].duration
            endTime = lastTime + (timed && d > 0 ? Double(d) * tb : 1 / avgFps)
        }
        var keys: [PacketKey: Int] = [:]
        var unique = true
        for (ordinal, p) in packets.enumerated() {
            let key = PacketKey(position: p.position, dts: p.dts ?? Int64.min, pts: p.pts ?? Int64.min)
            if keys.updateValue(ordinal, forKey: key) != nil { unique = false }
        }
        // A palette comes only with the first packet after opening: a seek would leave the
        // decoder without it (black frames), so such streams are read from a fresh open.
        packetByKey = unique && !carriesPalette ? keys : nil
    }

    /// `avg_frame_rate`, else `r_frame_rate`, else 0 (then derived from the times).
    static func averageRate(_ st: UnsafeMutablePointer<AVStream>?) -> Double {
        guard let st else { return 0 }
        for rate in [st.pointee.avg_frame_rate, st.pointee.r_frame_rate] where rate.num > 0 && rate.den > 0 {
            let value = Double(rate.num) / Double(rate.den)
            if value.isFinite, value > 0, value < 100_000 { return value }
        }
        return 0
    }

    /// The key of a packet just read, to find its ordinal after a seek.
    static func key(of packet: Packet) -> PacketKey {
        PacketKey(position: packet.position, dts: packet.dts ?? Int64.min, pts: packet.pts ?? Int64.min)
    }

    /// The keyframe to start decoding from to reach presentation index `index`: the last keyframe
    /// at or before its packet whose pts is not after the frame's (a leading B-frame of an open
    /// GOP needs the GOP before).
    func syncPoint(for index: Int) -> Int? {
        let ordinal = presented[index]
        let framePts = packets[ordinal].pts ?? Int64.max
        var lo = 0, hi = keyframes.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if keyframes[mid] <= ordinal { lo = mid + 1 } else { hi = mid }
        }
        var k = lo - 1
        while k >= 0 {
            let candidate = keyframes[k]
            if let p = packets[candidate].pts, p <= framePts { return candidate }
            if packets[candidate].pts == nil { return candidate }
            k -= 1
        }
        return nil
    }

    /// The keyframe before keyframe ordinal `ordinal`, for a retry after a seek landed late.
    func keyframe(before ordinal: Int) -> Int? {
        keyframes.last { $0 < ordinal }
    }

    /// Presentation indices whose time lies in `[start, end)`.
    func range(start: Double?, end: Double?) -> Range<Int> {
        let epsilon = 1e-9
        let lower = start.map { s in times.firstIndex { $0 >= s - epsilon } ?? times.count } ?? 0
        let upper = end.map { e in times.firstIndex { $0 >= e - epsilon } ?? times.count } ?? times.count
        return lower..<max(lower, upper)
    }

    /// The frame shown at time `t` (seconds, same origin): the last frame whose time is ≤ t.
    func frameShown(at t: Double) -> Int? {
        guard !times.isEmpty, t >= 0, t < endTime else { return nil }
        var lo = 0, hi = times.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if times[mid] <= t + 1e-9 { lo = mid + 1 } else { hi = mid }
        }
        return max(0, lo - 1)
    }
}
