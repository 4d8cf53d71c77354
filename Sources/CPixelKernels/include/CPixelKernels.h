#ifndef CLIPVISOR_PIXEL_KERNELS_H
#define CLIPVISOR_PIXEL_KERNELS_H
// Byte shuffles between packed RGB24 and R, G, B planes. In C because clang vectorises these
// stride-3 loops (pshufb/AVX2, ~35 GB/s) when allowed to target SSSE3/AVX2, which is chosen
// at run time here; the same loop in Swift, or in C for baseline x86-64, runs at ~1.5 GB/s, and
// at native size that made TCHW output cost more than decoding (bench/e2e.py W2).

#include <stdint.h>

#pragma clang assume_nonnull begin

/// Splits `count` packed RGB24 pixels into three planes.
void cv_rgb24_to_planes(const uint8_t *packed, uint8_t *red, uint8_t *green, uint8_t *blue, long count);

/// Joins three planes of `count` pixels into packed RGB24.
void cv_planes_to_rgb24(const uint8_t *red, const uint8_t *green, const uint8_t *blue, uint8_t *packed, long count);

#pragma clang assume_nonnull end
#endif
