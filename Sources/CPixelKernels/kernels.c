#include "CPixelKernels.h"

// One loop body per instruction set; the compiler vectorises each for its target.
#define SPLIT(name, attributes)                                                                  \
    attributes static void name(const uint8_t *restrict p, uint8_t *restrict r,                \
                                uint8_t *restrict g, uint8_t *restrict b, long n) {             \
        for (long x = 0; x < n; x++) {                                                           \
            r[x] = p[3 * x];                                                                     \
            g[x] = p[3 * x + 1];                                                                 \
            b[x] = p[3 * x + 2];                                                                 \
        }                                                                                        \
    }

#define JOIN(name, attributes)                                                                   \
    attributes static void name(const uint8_t *restrict r, const uint8_t *restrict g,          \
                                const uint8_t *restrict b, uint8_t *restrict p, long n) {       \
        for (long x = 0; x < n; x++) {                                                           \
            p[3 * x] = r[x];                                                                     \
            p[3 * x + 1] = g[x];                                                                 \
            p[3 * x + 2] = b[x];                                                                 \
        }                                                                                        \
    }

#if defined(__x86_64__)
SPLIT(split_avx2, __attribute__((target("avx2"))))
SPLIT(split_ssse3, __attribute__((target("ssse3"))))
JOIN(join_avx2, __attribute__((target("avx2"))))
JOIN(join_ssse3, __attribute__((target("ssse3"))))
#endif
SPLIT(split_baseline, )
JOIN(join_baseline, )

void cv_rgb24_to_planes(const uint8_t *packed, uint8_t *red, uint8_t *green, uint8_t *blue, long count) {
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2")) return split_avx2(packed, red, green, blue, count);
    if (__builtin_cpu_supports("ssse3")) return split_ssse3(packed, red, green, blue, count);
#endif
    split_baseline(packed, red, green, blue, count);
}

void cv_planes_to_rgb24(const uint8_t *red, const uint8_t *green, const uint8_t *blue, uint8_t *packed, long count) {
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2")) return join_avx2(red, green, blue, packed, count);
    if (__builtin_cpu_supports("ssse3")) return join_ssse3(red, green, blue, packed, count);
#endif
    join_baseline(red, green, blue, packed, count);
}
