#ifndef CLIPVISOR_STORED_FRAME_H
#define CLIPVISOR_STORED_FRAME_H
// Stored zstd frames: the frame format of RFC 8878 with raw (uncompressed) blocks and the XXH64
// content checksum. Natural video frames do not compress at zstd's fastest levels (ratio
// 1.00-1.01), so compressing them only costs CPU and two copies; a stored frame is the same
// bytes behind a 10-byte header and a 3-byte header every 128 KiB, written straight from the
// caller's buffer with pwritev. Every zstd decoder reads it and checks the checksum.

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#pragma clang assume_nonnull begin

/// XXH64 of `size` bytes with seed 0 (the checksum zstd frames carry, low 32 bits).
uint64_t cv_xxh64(const void *_Nullable data, size_t size);

/// Longest frame header a stored frame has (magic, descriptor, window, 8-byte content size).
enum { CV_STORED_FRAME_MAX_HEADER = 14 };

/// Writes `data` as one stored zstd frame at `offset` of `fd`. Returns the frame's size in bytes
/// (header, block headers, payload, checksum) or -1 with errno set. `checksum` receives the frame's
/// 32-bit content checksum (as it appears in its last 4 bytes); `header` (CV_STORED_FRAME_MAX_HEADER
/// bytes) the frame header as written, and `header_bytes` its length.
int64_t cv_write_stored_zstd_frame(int fd, int64_t offset, const void *_Nullable data, size_t size,
                                   uint32_t *checksum, uint8_t *header, size_t *header_bytes);

/// The size `cv_write_stored_zstd_frame` gives a frame of `size` bytes.
size_t cv_stored_zstd_frame_size(size_t size);

#pragma clang assume_nonnull end

#endif
