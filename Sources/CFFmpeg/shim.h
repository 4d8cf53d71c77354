#ifndef CLIPVISOR_CFFMPEG_SHIM_H
#define CLIPVISOR_CFFMPEG_SHIM_H
#include <errno.h>
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
#endif
