#define _GNU_SOURCE
#include "CStoredFrame.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

// --- XXH64 (Yann Collet's algorithm, as specified in xxhash's doc/xxhash_spec.md) ---------

static const uint64_t P1 = 0x9E3779B185EBCA87ULL;
static const uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
static const uint64_t P3 = 0x165667B19E3779F9ULL;
static const uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
static const uint64_t P5 = 0x27D4EB2F165667C5ULL;

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t read64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }  // x86-64: little-endian
static inline uint32_t read32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t xxh_round(uint64_t acc, uint64_t input) {
    acc += input * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}
static inline uint64_t merge_round(uint64_t acc, uint64_t value) {
    acc ^= xxh_round(0, value);
    return acc * P1 + P4;
}

uint64_t cv_xxh64(const void *data, size_t size) {
    const uint8_t *p = data;
    const uint8_t *end = p + size;
    uint64_t h;
    if (size >= 32) {
        uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0 - P1;
        const uint8_t *limit = end - 32;
        do {
            v1 = xxh_round(v1, read64(p));
            v2 = xxh_round(v2, read64(p + 8));
            v3 = xxh_round(v3, read64(p + 16));
            v4 = xxh_round(v4, read64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = merge_round(h, v1);
        h = merge_round(h, v2);
        h = merge_round(h, v3);
        h = merge_round(h, v4);
    } else {
        h = P5;
    }
    h += (uint64_t)size;
    while (p + 8 <= end) {
        h ^= xxh_round(0, read64(p));
        h = rotl64(h, 27) * P1 + P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)read32(p) * P1;
        h = rotl64(h, 23) * P2 + P3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * P5;
        h = rotl64(h, 11) * P1;
        p++;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

// --- The frame ----------------------------------------------------------------------------

// Window 128 KiB (Window_Descriptor: exponent 7, mantissa 0), so raw blocks may be 128 KiB and
// a streaming decoder needs no more than that: never Single_Segment, whose window would be the
// whole content and which streaming decoders refuse above their window limit (128 MiB).
enum { BLOCK_MAX = 128 * 1024, WINDOW_DESCRIPTOR = 7 << 3 };

static size_t frame_header_size(size_t size) { return size > UINT32_MAX ? 14 : 10; }

size_t cv_stored_zstd_frame_size(size_t size) {
    size_t blocks = size == 0 ? 1 : (size + BLOCK_MAX - 1) / BLOCK_MAX;
    return frame_header_size(size) + 3 * blocks + size + 4;
}

int64_t cv_write_stored_zstd_frame(int fd, int64_t offset, const void *data, size_t size,
                                   uint32_t *checksum, uint8_t *header, size_t *header_bytes) {
    size_t header_size = frame_header_size(size);
    const uint32_t magic = 0xFD2FB528u;
    memcpy(header, &magic, 4);
    // Frame_Header_Descriptor: Frame_Content_Size_flag 2 (4 bytes) or 3 (8 bytes), no single
    // segment, Content_Checksum_flag, no dictionary.
    header[4] = (uint8_t)(((size > UINT32_MAX ? 3u : 2u) << 6) | (1u << 2));
    header[5] = WINDOW_DESCRIPTOR;
    uint64_t content = size;
    memcpy(header + 6, &content, header_size - 6);

    uint32_t sum = (uint32_t)cv_xxh64(data, size);
    *checksum = sum;
    *header_bytes = header_size;

    size_t blocks = size == 0 ? 1 : (size + BLOCK_MAX - 1) / BLOCK_MAX;
    // Block headers live in one array; iovecs are sent IOV_MAX at a time.
    enum { BATCH_BLOCKS = 256 };  // 2 iovecs per block (+ header, + checksum) stays under IOV_MAX
    uint8_t block_headers[BATCH_BLOCKS][3];
    struct iovec iov[2 * BATCH_BLOCKS + 2];
    const uint8_t *payload = data;
    int64_t position = offset;
    size_t done_blocks = 0;
    size_t consumed = 0;
    while (done_blocks < blocks) {
        int n = 0;
        if (done_blocks == 0) iov[n++] = (struct iovec){header, header_size};
        size_t batch = blocks - done_blocks < BATCH_BLOCKS ? blocks - done_blocks : BATCH_BLOCKS;
        for (size_t i = 0; i < batch; i++) {
            size_t length = size - consumed < BLOCK_MAX ? size - consumed : BLOCK_MAX;
            int last = done_blocks + i + 1 == blocks;
            // Block_Header: Last_Block (bit 0), Block_Type 0 = Raw (bits 1-2), Block_Size (bits 3-23).
            uint32_t word = (uint32_t)(length << 3) | (uint32_t)last;
            block_headers[i][0] = (uint8_t)word;
            block_headers[i][1] = (uint8_t)(word >> 8);
            block_headers[i][2] = (uint8_t)(word >> 16);
            iov[n++] = (struct iovec){block_headers[i], 3};
            if (length) iov[n++] = (struct iovec){(void *)(payload + consumed), length};
            consumed += length;
        }
        done_blocks += batch;
        if (done_blocks == blocks) iov[n++] = (struct iovec){&sum, 4};
        // pwritev may write less than asked: advance through the iovecs until all is written.
        int first = 0;
        while (first < n) {
            ssize_t written = pwritev(fd, iov + first, n - first, position);
            if (written < 0) {
                if (errno == EINTR) continue;
                return -1;
            }
            if (written == 0) {
                errno = EIO;
                return -1;
            }
            position += written;
            size_t left = (size_t)written;
            while (first < n && left >= iov[first].iov_len) {
                left -= iov[first].iov_len;
                first++;
            }
            if (first < n && left) {
                iov[first].iov_base = (uint8_t *)iov[first].iov_base + left;
                iov[first].iov_len -= left;
            }
        }
    }
    return position - offset;
}
