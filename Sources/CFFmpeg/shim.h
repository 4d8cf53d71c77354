#ifndef CLIPVISOR_CFFMPEG_SHIM_H
#define CLIPVISOR_CFFMPEG_SHIM_H
#include <errno.h>
#include <math.h>
#include <libavformat/avformat.h>
#include <libavcodec/avcodec.h>
#include <libavutil/avutil.h>
#include <libavutil/display.h>
#include <libavutil/imgutils.h>
#include <libavutil/opt.h>
#include <libavutil/pixdesc.h>
#include <libavutil/channel_layout.h>
#include <libavutil/samplefmt.h>
#include <libswscale/swscale.h>
#include <libswresample/swresample.h>

/// AVERROR(e): a macro; FFmpeg error codes are negated errno values.
static inline int cffmpeg_averror(int e) { return AVERROR(e); }
/// AVERROR_EOF: a macro built from FFERRTAG, which does not import.
static const int CFFMPEG_AVERROR_EOF = AVERROR_EOF;
/// AVERROR(EAGAIN): the "send more input / read more output" signal of the codec API.
static const int CFFMPEG_AVERROR_EAGAIN = AVERROR(EAGAIN);
/// AVERROR(ENOMEM): allocation failure, reported as `out_of_memory`.
static const int CFFMPEG_AVERROR_ENOMEM = AVERROR(ENOMEM);
/// AVERROR_INVALIDDATA: damaged input.
static const int CFFMPEG_AVERROR_INVALIDDATA = AVERROR_INVALIDDATA;
/// AVERROR_DECODER_NOT_FOUND: a codec FFmpeg was built without.
static const int CFFMPEG_AVERROR_DECODER_NOT_FOUND = AVERROR_DECODER_NOT_FOUND;
/// AVERROR_DEMUXER_NOT_FOUND: a container FFmpeg does not know.
static const int CFFMPEG_AVERROR_DEMUXER_NOT_FOUND = AVERROR_DEMUXER_NOT_FOUND;
/// AVERROR_PATCHWELCOME: a feature FFmpeg knows but does not implement.
static const int CFFMPEG_AVERROR_PATCHWELCOME = AVERROR_PATCHWELCOME;
/// AV_NOPTS_VALUE: a macro with a cast.
static const int64_t CFFMPEG_NOPTS_VALUE = AV_NOPTS_VALUE;
/// AV_TIME_BASE_Q: a compound literal.
static inline AVRational cffmpeg_time_base_q(void) { return AV_TIME_BASE_Q; }

/// av_log is variadic; always log through a "%s" format so a message can never be a format string.
static inline void cffmpeg_log(void *avcl, int level, const char *message) {
    av_log(avcl, level, "%s", message);
}

/// Formats one log line from FFmpeg's log callback (its `va_list` does not cross into Swift).
static inline int cffmpeg_format_log_line(void *avcl, int level, const char *fmt, va_list vl,
                                          char *line, int line_size, int *print_prefix) {
    return av_log_format_line2(avcl, level, fmt, vl, line, line_size, print_prefix);
}

/// The signature of FFmpeg's log callback, as a plain function pointer Swift can supply.
typedef void (*cffmpeg_log_callback)(void *avcl, int level, const char *fmt, va_list vl);
/// av_log_set_callback, typed with `cffmpeg_log_callback` so Swift sees a C function pointer.
static inline void cffmpeg_set_log_callback(cffmpeg_log_callback callback) {
    av_log_set_callback(callback);
}

/// sws_scale over a whole decoded frame. `AVFrame.data`/`linesize` arrive in Swift as 8-element
/// tuples, so the cast to sws_scale's `const uint8_t *const[]` is done here.
static inline int cffmpeg_sws_scale_frame(struct SwsContext *ctx, const AVFrame *frame,
                                          uint8_t *const dst[4], const int dst_stride[4]) {
    return sws_scale(ctx, (const uint8_t *const *)frame->data, frame->linesize, 0, frame->height,
                     dst, dst_stride);
}

/// The display-matrix rotation of a stream in degrees counterclockwise, as av_display_rotation_get
/// returns it; NAN when the stream has no display matrix (the side data is a byte array in C).
static inline double cffmpeg_stream_display_rotation(const AVStream *st) {
    size_t size = 0;
    const uint8_t *matrix = av_stream_get_side_data(st, AV_PKT_DATA_DISPLAYMATRIX, &size);
    if (!matrix || size < 9 * sizeof(int32_t)) return NAN;
    return av_display_rotation_get((const int32_t *)matrix);
}

/// avformat_find_stream_info with every stream's probing decoder limited to `max_pixels` per
/// frame: finding the parameters decodes a frame for some formats (PNG, MJPEG...), and a huge
/// one must be refused there, not after gigabytes were allocated.
static inline int cffmpeg_find_stream_info(AVFormatContext *ctx, int64_t max_pixels) {
    unsigned n = ctx->nb_streams;
    AVDictionary **options = av_calloc(n ? n : 1, sizeof *options);
    if (!options) return AVERROR(ENOMEM);
    for (unsigned i = 0; i < n; i++) av_dict_set_int(&options[i], "max_pixels", max_pixels, 0);
    int rc = avformat_find_stream_info(ctx, options);
    for (unsigned i = 0; i < n; i++) av_dict_free(&options[i]);
    av_free(options);
    return rc;
}

/// Whether the stream's display matrix mirrors the picture (negative determinant), which
/// av_display_rotation_get cannot express: a horizontal flip reads as a 180° rotation.
static inline int cffmpeg_stream_display_is_mirrored(const AVStream *st) {
    size_t size = 0;
    const uint8_t *bytes = av_stream_get_side_data(st, AV_PKT_DATA_DISPLAYMATRIX, &size);
    if (!bytes || size < 9 * sizeof(int32_t)) return 0;
    const int32_t *m = (const int32_t *)bytes;
    return (double)m[0] * m[4] - (double)m[1] * m[3] < 0;
}

/// Whether a packet carries CENC/CBCS encryption info: FFmpeg "decodes" encrypted samples without
/// a key into garbage, so the worker refuses such streams instead.
static inline int cffmpeg_packet_is_encrypted(const AVPacket *pkt) {
    size_t size = 0;
    return av_packet_get_side_data(pkt, AV_PKT_DATA_ENCRYPTION_INFO, &size) != NULL;
}

/// Whether a stream carries encryption init data (a `pssh`/`tenc` box): the stream is encrypted.
static inline int cffmpeg_stream_is_encrypted(const AVStream *st) {
    size_t size = 0;
    return av_stream_get_side_data(st, AV_PKT_DATA_ENCRYPTION_INIT_INFO, &size) != NULL;
}

/// The name FFmpeg's log prefix would show for a logging context ("h264", "mov,mp4,m4a,..."),
/// or NULL. The context is a struct whose first member is an `AVClass *`, which Swift cannot see.
static inline const char *cffmpeg_log_context_name(void *avcl) {
    if (!avcl) return NULL;
    AVClass *cls = *(AVClass **)avcl;
    if (!cls || !cls->item_name) return NULL;
    return cls->item_name(avcl);
}

/// Most channels the audio helpers below accept (FFmpeg's own decoders stay far below it).
#define CFFMPEG_MAX_AUDIO_CHANNELS 64

/// The channel layout to resample a decoded frame from: the frame's own, or, when the decoder
/// left it unspecified (AV_CHANNEL_ORDER_UNSPEC: WAV without a channel mask, some AIFF), the
/// default layout for its channel count, as the ffmpeg CLI guesses it. Returns 0 or an AVERROR.
static inline int cffmpeg_frame_channel_layout(const AVFrame *frame, AVChannelLayout *out) {
    if (frame->ch_layout.order == AV_CHANNEL_ORDER_UNSPEC || !av_channel_layout_check(&frame->ch_layout)) {
        if (frame->ch_layout.nb_channels <= 0) return AVERROR(EINVAL);
        av_channel_layout_default(out, frame->ch_layout.nb_channels);
        return 0;
    }
    return av_channel_layout_copy(out, &frame->ch_layout);
}

/// swr_convert of `count` samples of a decoded frame, starting at sample `first` (to drop the
/// head of a frame that overlaps audio already placed). The input plane pointers must be offset
/// differently for planar and packed formats, and `AVFrame.extended_data` has one pointer per
/// channel for planar audio with more than 8 channels: simplest done here.
static inline int cffmpeg_swr_convert_frame(struct SwrContext *swr, uint8_t **out, int out_count,
                                            const AVFrame *frame, int first, int count) {
    int channels = frame->ch_layout.nb_channels;
    if (channels <= 0 || channels > CFFMPEG_MAX_AUDIO_CHANNELS) return AVERROR(EINVAL);
    if (first < 0 || count < 0 || first + count > frame->nb_samples) return AVERROR(EINVAL);
    enum AVSampleFormat format = (enum AVSampleFormat)frame->format;
    int planar = av_sample_fmt_is_planar(format);
    int bytes = av_get_bytes_per_sample(format);
    if (bytes <= 0) return AVERROR(EINVAL);
    const uint8_t *in[CFFMPEG_MAX_AUDIO_CHANNELS];
    int planes = planar ? channels : 1;
    size_t step = planar ? (size_t)bytes : (size_t)bytes * (size_t)channels;
    for (int i = 0; i < planes; i++) in[i] = frame->extended_data[i] + (size_t)first * step;
    return swr_convert(swr, out, out_count, in, count);
}

/// swr_convert of `count` samples of silence in the input format (zero, or 0x80 for unsigned
/// 8-bit): fills a timestamp gap through the resampler so its filter and phase stay continuous.
static inline int cffmpeg_swr_convert_silence(struct SwrContext *swr, uint8_t **out, int out_count,
                                              int count, int format, int channels) {
    if (channels <= 0 || channels > CFFMPEG_MAX_AUDIO_CHANNELS || count <= 0) return AVERROR(EINVAL);
    uint8_t **in = NULL;
    int rc = av_samples_alloc_array_and_samples(&in, NULL, channels, count, (enum AVSampleFormat)format, 0);
    if (rc < 0) return rc;
    av_samples_set_silence(in, 0, count, channels, (enum AVSampleFormat)format);
    rc = swr_convert(swr, out, out_count, (const uint8_t **)in, count);
    av_freep(&in[0]);
    av_freep(&in);
    return rc;
}

/// swr_convert with no input: the end-of-stream flush that returns the samples the filter holds.
static inline int cffmpeg_swr_flush(struct SwrContext *swr, uint8_t **out, int out_count) {
    return swr_convert(swr, out, out_count, NULL, 0);
}

#endif
