import CFFmpeg
import Shared

/// An owned `AVPacket`, freed with the value.
final class Packet {
    let pointer: UnsafeMutablePointer<AVPacket>

    init() throws(DecodeFailure) {
        guard let p = av_packet_alloc() else {
            throw DecodeFailure(.outOfMemory, "out of memory allocating a packet")
        }
        pointer = p
    }

    deinit {
        var p: UnsafeMutablePointer<AVPacket>? = pointer
        av_packet_free(&p)
    }

    var streamIndex: Int { Int(pointer.pointee.stream_index) }
    var pts: Int64? { pointer.pointee.pts == CFFMPEG_NOPTS_VALUE ? nil : pointer.pointee.pts }
    var dts: Int64? { pointer.pointee.dts == CFFMPEG_NOPTS_VALUE ? nil : pointer.pointee.dts }
    var duration: Int64 { pointer.pointee.duration }
    var position: Int64 { pointer.pointee.pos }
    var size: Int { Int(pointer.pointee.size) }
    var isKey: Bool { pointer.pointee.flags & AV_PKT_FLAG_KEY != 0 }
    /// A palette rides with this packet (AVI/MOV give it to the first packet after opening only).
    var carriesPalette: Bool { av_packet_get_side_data(pointer, AV_PKT_DATA_PALETTE, nil) != nil }
    /// Edit-list preroll (MP4): needed by the decoder, never presented.
    var isDiscard: Bool { pointer.pointee.flags & AV_PKT_FLAG_DISCARD != 0 }
    var isEncrypted: Bool { cffmpeg_packet_is_encrypted(pointer) != 0 }
    var firstByte: UInt8? { size > 0 ? pointer.pointee.data?[0] : nil }

    func unref() { av_packet_unref(pointer) }
}

/// An open media file: the `AVFormatContext`, shared by the video path (and later the audio
/// path, which reads the same demuxer). Owns the context and closes it on deinit.
final class Demuxer {
    let path: String
    /// The name used in messages (for fd clips, the client's path rather than /proc/self/fd/N).
    let displayPath: String
    private(set) var context: UnsafeMutablePointer<AVFormatContext>
    /// Error lines FFmpeg logged while opening, kept for failure details.
    let openLogMark: Int

    /// Opens `path` and reads stream parameters (`avformat_open_input`, `avformat_find_stream_info`),
    /// refusing to decode frames above `maxPixels` while probing. With `probesVideo` false the
    /// video streams are left out of that probing (their packets are not read, no video frame
    /// is decoded): for a second demuxer that reads only the audio, whose probing decodes a
    /// few frames of a 720p video for nothing (6-7 ms of a 30 s AAC track's 24 ms).
    init(path: String, displayPath: String, maxPixels: Int = DecodeOptions().maxSourcePixels, probesVideo: Bool = true) throws(DecodeFailure) {
        self.path = path
        self.displayPath = displayPath
        try FFError.checkInput(path: path)
        openLogMark = FFLog.mark()
        var ctx: UnsafeMutablePointer<AVFormatContext>? = nil
        var rc = avformat_open_input(&ctx, path, nil, nil)
        guard rc >= 0, let opened = ctx else {
            var failure = FFError.failure(rc, "cannot open", path: displayPath, logMark: openLogMark)
            if rc == CFFMPEG_AVERROR_INVALIDDATA {
                if FFLog.summary(since: openLogMark) == nil {
                    // "Invalid data found when processing input" and no demuxer had anything to
                    // say: nothing recognised the file.
                    failure.reason = .unsupported
                    failure.message = "\(displayPath): not a recognised media container (\(FFError.text(rc)))"
                } else {
                    // A demuxer took the file and then complained: a damaged container.
                    failure.reason = .decodeError
                    failure.message = "\(displayPath): damaged container (\(FFError.text(rc)))"
                }
            }
            throw failure
        }
        context = opened
        let allStreams = Set(0..<streamCount)
        if !probesVideo {
            discardAll(except: allStreams.filter { stream($0).pointee.codecpar.pointee.codec_type != AVMEDIA_TYPE_VIDEO })
        }
        rc = cffmpeg_find_stream_info(opened, Int64(maxPixels))
        if !probesVideo { discardAll(except: allStreams) }
        if rc < 0 {
            throw FFError.failure(rc, "cannot read stream parameters", path: displayPath, logMark: openLogMark)
        }
    }

    deinit {
        var ctx: UnsafeMutablePointer<AVFormatContext>? = context
        avformat_close_input(&ctx)
    }

    var streamCount: Int { Int(context.pointee.nb_streams) }

    func stream(_ index: Int) -> UnsafeMutablePointer<AVStream> {
        context.pointee.streams[index]!
    }

    /// The container's short names ("mov,mp4,m4a,3gp,3g2,mj2").
    var formatName: String? {
        guard let iformat = context.pointee.iformat, let name = iformat.pointee.name else { return nil }
        return String(cString: name)
    }

    /// Seconds, from the container or nil.
    var duration: Double? {
        let d = context.pointee.duration
        guard d != CFFMPEG_NOPTS_VALUE, d > 0 else { return nil }
        return Double(d) / Double(AV_TIME_BASE)
    }

    /// Size of the file in bytes as the I/O layer sees it.
    var fileSize: Int? {
        guard let pb = context.pointee.pb else { return nil }
        let size = avio_size(pb)
        return size >= 0 ? Int(size) : nil
    }

    /// The stream to decode for `type`: FFmpeg's choice (`av_find_best_stream`) unless that is an
    /// attached picture (cover art), which is never "the video".
    func bestStream(_ type: AVMediaType) -> Int? {
        let candidates = (0..<streamCount).filter { i in
            let st = stream(i)
            guard let par = st.pointee.codecpar else { return false }
            return par.pointee.codec_type == type && st.pointee.disposition & AV_DISPOSITION_ATTACHED_PIC == 0
        }
        guard !candidates.isEmpty else { return nil }
        let best = av_find_best_stream(context, type, -1, -1, nil, 0)
        if best >= 0, candidates.contains(Int(best)) { return Int(best) }
        return candidates.first
    }

    /// Tells the demuxer to skip every stream but `keep` (cheap packet reads for the others).
    func discardAll(except keep: Set<Int>) {
        for i in 0..<streamCount {
            stream(i).pointee.discard = keep.contains(i) ? AVDISCARD_DEFAULT : AVDISCARD_ALL
        }
    }

    /// Outcome of one `av_read_frame`.
    enum ReadResult {
        case packet
        case endOfFile
        /// A read error (damaged or truncated file): the code, after the packets read so far.
        case error(Int32)
    }

    /// `av_read_frame` into `packet` (unreferenced first).
    func read(into packet: Packet) -> ReadResult {
        packet.unref()
        let rc = av_read_frame(context, packet.pointer)
        if rc >= 0 { return .packet }
        if rc == CFFMPEG_AVERROR_EOF { return .endOfFile }
        return .error(rc)
    }

    /// Seeks `streamIndex` to the last keyframe at or before `timestamp` (stream time base).
    /// Returns false when the demuxer cannot seek there.
    func seek(stream streamIndex: Int, to timestamp: Int64) -> Bool {
        let rc = avformat_seek_file(context, Int32(streamIndex), Int64.min, timestamp, timestamp, 0)
        if rc >= 0 { return true }
        return av_seek_frame(context, Int32(streamIndex), timestamp, AVSEEK_FLAG_BACKWARD) >= 0
    }

    /// Seeks to a byte position (streams without timestamps).
    func seek(bytePosition: Int64) -> Bool {
        av_seek_frame(context, -1, bytePosition, AVSEEK_FLAG_BYTE) >= 0
    }
}
