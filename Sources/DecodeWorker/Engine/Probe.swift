import CFFmpeg
import Shared

/// `clipvisor-worker probe`: what a file holds, without decoding frames.
///
/// Audio streams report codec, profile (HE-AAC v2...), sample rate, channels, layout name, sample
/// format, frame size, start time and duration as the container states them; `audio_stream` is
/// the one `--audio` decodes. A container's duration can lie (a truncated MP3 whose Xing header
/// promises minutes): only decoding measures it, and `decode --audio` warns when they disagree.
///
/// Frame counts come from the container when its count is reliable (MP4/AVI with an index
/// that matches `nb_frames` and holds no edit-list preroll), else from a pass over the packets
/// (no decoding): `frame_count_source` says which, and `container_frame_count` keeps the
/// container's own claim so that a disagreement is visible. An index that points past the end of
/// the file (a truncated "faststart" MP4) is not reliable: its packets are counted instead.
enum Prober {
    static func probe(path: String, displayPath: String) throws(DecodeFailure) -> JSONValue {
        FFLog.install()
        FFLog.reset()
        let demuxer = try Demuxer(path: path, displayPath: displayPath)
        let video = demuxer.bestStream(AVMEDIA_TYPE_VIDEO)
        let audio = demuxer.bestStream(AVMEDIA_TYPE_AUDIO)
        var streams: [JSONValue] = []
        var countedTables: [Int: FrameTable] = [:]
        for i in 0..<demuxer.streamCount {
            let st = demuxer.stream(i)
            guard let parPointer = st.pointee.codecpar else { continue }
            let par = parPointer.pointee
            var fields: [String: JSONValue] = [
                "index": .number(Double(i)),
                "codec": .string(StreamInfo.name(of: par.codec_id)),
                "time_base": .string("\(st.pointee.time_base.num)/\(st.pointee.time_base.den)"),
            ]
            if let s = StreamInfo.seconds(st.pointee.start_time, st.pointee.time_base) { fields["start_time"] = .number(s) }
            if let d = StreamInfo.seconds(st.pointee.duration, st.pointee.time_base), d >= 0 { fields["duration"] = .number(d) }
            if par.bit_rate > 0 { fields["bit_rate"] = .number(Double(par.bit_rate)) }
            switch par.codec_type {
            case AVMEDIA_TYPE_VIDEO:
                fields["type"] = "video"
                fields["width"] = .number(Double(par.width))
                fields["height"] = .number(Double(par.height))
                if let f = StreamInfo.pixelFormatName(par.format) { fields["pixel_format"] = .string(f) }
                let rate = FrameTable.averageRate(st)
                if rate > 0 { fields["avg_fps"] = .number(rate) }
                let attached = st.pointee.disposition & AV_DISPOSITION_ATTACHED_PIC != 0
                fields["attached_picture"] = .bool(attached)
                let (rotation, note) = StreamInfo.rotation(st)
                fields["rotation"] = .number(Double(rotation))
                if let note { fields["rotation_note"] = .string(note) }
                if par.color_range == AVCOL_RANGE_JPEG { fields["color_range"] = "full" }
                else if par.color_range == AVCOL_RANGE_MPEG { fields["color_range"] = "limited" }
                if let cs = av_color_space_name(par.color_space) { fields["color_space"] = .string(String(cString: cs)) }
                if st.pointee.nb_frames > 0 { fields["container_frame_count"] = .number(Double(st.pointee.nb_frames)) }
                if cffmpeg_stream_is_encrypted(st) != 0 { fields["encrypted"] = true }
                if !attached {
                    if StreamInfo.containerCountIsReliable(st),
                        StreamInfo.indexLiesWithinFile(st, fileSize: demuxer.fileSize.map { Int64($0) }) {
                        fields["frame_count"] = .number(Double(st.pointee.nb_frames))
                        fields["frame_count_source"] = "container"
                    } else {
                        countedTables[i] = nil
                        fields["frame_count_source"] = "packets"
                    }
                }
            case AVMEDIA_TYPE_AUDIO:
                fields["type"] = "audio"
                fields["sample_rate"] = .number(Double(par.sample_rate))
                fields["channels"] = .number(Double(par.ch_layout.nb_channels))
                let layout = withUnsafePointer(to: parPointer.pointee.ch_layout) { StreamInfo.channelLayoutName($0) }
                if let layout { fields["channel_layout"] = .string(layout) }
                if let f = av_get_sample_fmt_name(AVSampleFormat(rawValue: par.format)) {
                    fields["sample_format"] = .string(String(cString: f))
                }
                if par.frame_size > 0 { fields["frame_size"] = .number(Double(par.frame_size)) }
                if let profile = avcodec_profile_name(par.codec_id, par.profile) {
                    fields["profile"] = .string(String(cString: profile))
                }
                if cffmpeg_stream_is_encrypted(st) != 0 { fields["encrypted"] = true }
            case AVMEDIA_TYPE_SUBTITLE: fields["type"] = "subtitle"
            case AVMEDIA_TYPE_DATA: fields["type"] = "data"
            case AVMEDIA_TYPE_ATTACHMENT: fields["type"] = "attachment"
            default: fields["type"] = "unknown"
            }
            streams.append(.object(fields))
        }
        // Streams whose count needs a packet pass: one pass per such stream (usually just one).
        for (position, value) in streams.enumerated() {
            guard case .object(var fields) = value, fields["frame_count_source"] == "packets",
                let index = fields["index"]?.intValue
            else { continue }
            let pass = try Demuxer(path: path, displayPath: displayPath)
            let table = try FrameTable.scan(pass, streamIndex: index)
            countedTables[index] = table
            fields["frame_count"] = .number(Double(table.count))
            if table.readError != nil { fields["frame_count_note"] = "the demuxer stopped early: the file is damaged or truncated" }
            streams[position] = .object(fields)
        }
        var out: [String: JSONValue] = [
            "path": .string(displayPath),
            "streams": .array(streams),
            "video_stream": video.map { .number(Double($0)) } ?? .null,
            "audio_stream": audio.map { .number(Double($0)) } ?? .null,
        ]
        if let name = demuxer.formatName { out["container"] = .string(name) }
        if let d = demuxer.duration { out["duration"] = .number(d) }
        if let size = demuxer.fileSize { out["size_bytes"] = .number(Double(size)) }
        if demuxer.context.pointee.bit_rate > 0 { out["bit_rate"] = .number(Double(demuxer.context.pointee.bit_rate)) }
        let start = demuxer.context.pointee.start_time
        if start != CFFMPEG_NOPTS_VALUE { out["start_time"] = .number(Double(start) / Double(AV_TIME_BASE)) }
        out["source"] = JSONCoding.encode(
            StreamInfo.source(demuxer, video: video, table: video.flatMap { countedTables[$0] }))
        if let logged = FFLog.summary() { out["log"] = .string(logged) }
        return .object(out)
    }
}
