import CFFmpeg
import Shared

/// Facts about streams that probe and decode both report.
enum StreamInfo {
    /// Clockwise degrees (0, 90, 180, 270) that upright the stream, from its display matrix
    /// (`av_display_rotation_get` gives counterclockwise degrees), and a note when the matrix is
    /// unusable (not finite, not a multiple of 90°, or mirroring).
    static func rotation(_ st: UnsafeMutablePointer<AVStream>) -> (degrees: Int, note: String?) {
        let ccw = cffmpeg_stream_display_rotation(st)
        if ccw.isNaN { return (0, nil) }
        if cffmpeg_stream_display_is_mirrored(st) != 0 {
            return (0, "the display matrix mirrors the picture, which is not applied; the frames are returned as stored")
        }
        guard ccw.isFinite, abs(ccw) < 1e6 else {
            return (0, "the display matrix holds no valid rotation; the frames are returned as stored")
        }
        var cw = (-ccw).truncatingRemainder(dividingBy: 360)
        if cw < 0 { cw += 360 }
        let quarter = (cw / 90).rounded()
        guard abs(cw - quarter * 90) <= 2 else {
            return (0, "display-matrix rotation of \(cw)° is not a multiple of 90°; ignored")
        }
        return ((Int(quarter) * 90) % 360, nil)
    }

    static func name(of codec: AVCodecID) -> String {
        avcodec_get_name(codec).map { String(cString: $0) } ?? "unknown"
    }

    static func pixelFormatName(_ raw: Int32) -> String? {
        guard raw >= 0, let name = av_get_pix_fmt_name(AVPixelFormat(rawValue: raw)) else { return nil }
        return String(cString: name)
    }

    static func seconds(_ ticks: Int64, _ tb: AVRational) -> Double? {
        guard ticks != CFFMPEG_NOPTS_VALUE, tb.den != 0 else { return nil }
        return Double(ticks) * Double(tb.num) / Double(tb.den)
    }

    static func channelLayoutName(_ layout: UnsafePointer<AVChannelLayout>) -> String? {
        var buffer = [CChar](repeating: 0, count: 128)
        let n = buffer.withUnsafeMutableBufferPointer { av_channel_layout_describe(layout, $0.baseAddress, $0.count) }
        guard n > 0 else { return nil }
        return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    /// Whether the container's `nb_frames` can be trusted as the number of presented frames:
    /// present, and matching an index without edit-list preroll or empty entries.
    static func containerCountIsReliable(_ st: UnsafeMutablePointer<AVStream>) -> Bool {
        let nb = st.pointee.nb_frames
        guard nb > 0 else { return false }
        let entries = avformat_index_get_entries_count(st)
        guard entries == Int32(clamping: nb) else { return false }
        for i in 0..<entries {
            guard let entry = avformat_index_get_entry(st, i) else { return false }
            if entry.pointee.flags & AVINDEX_DISCARD_FRAME != 0 || entry.pointee.size == 0 { return false }
        }
        return true
    }

    /// Whether every index entry of the stream lies inside a file of `fileSize` bytes. An index
    /// that points past the end (an MP4 cut short after its `moov`: "faststart" files truncated in
    /// transfer) promises packets that the demuxer cannot read, so its count is not the file's.
    static func indexLiesWithinFile(_ st: UnsafeMutablePointer<AVStream>, fileSize: Int64?) -> Bool {
        guard let fileSize, fileSize > 0 else { return true }
        let entries = avformat_index_get_entries_count(st)
        var end: Int64 = 0
        for i in 0..<entries {
            guard let entry = avformat_index_get_entry(st, i) else { return false }
            end = max(end, entry.pointee.pos + Int64(entry.pointee.size))
        }
        return end <= fileSize
    }

    /// The source description of a result: container, size, video and audio stream basics.
    static func source(_ demuxer: Demuxer, video: Int?, table: FrameTable?, audio: Int? = nil) -> SourceInfo {
        var info = SourceInfo()
        info.container = demuxer.formatName
        info.duration = demuxer.duration
        info.sizeBytes = demuxer.fileSize
        if let video {
            let st = demuxer.stream(video)
            let par = st.pointee.codecpar.pointee
            info.videoCodec = name(of: par.codec_id)
            info.width = Int(par.width)
            info.height = Int(par.height)
            info.pixelFormat = pixelFormatName(par.format)
            let rate = FrameTable.averageRate(st)
            info.fps = rate > 0 ? rate : table?.avgFps
            info.rotation = rotation(st).degrees
            if info.duration == nil, let d = seconds(st.pointee.duration, st.pointee.time_base), d > 0 {
                info.duration = d
            }
            if let table {
                info.frameCount = table.count
                info.frameCountSource = "packets"
            } else if containerCountIsReliable(st) {
                info.frameCount = Int(st.pointee.nb_frames)
                info.frameCountSource = "container"
            }
        }
        if let audio = audio ?? demuxer.bestStream(AVMEDIA_TYPE_AUDIO) {
            let st = demuxer.stream(audio)
            let par = st.pointee.codecpar
            info.audioCodec = name(of: par!.pointee.codec_id)
            info.audioSampleRate = Int(par!.pointee.sample_rate)
            info.audioChannels = Int(par!.pointee.ch_layout.nb_channels)
            info.audioChannelLayout = withUnsafePointer(to: &par!.pointee.ch_layout) { channelLayoutName($0) }
            if st.pointee.duration > 0, let d = seconds(st.pointee.duration, st.pointee.time_base) {
                info.audioDuration = d
            }
        }
        return info
    }
}
