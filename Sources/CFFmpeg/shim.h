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
#endif
