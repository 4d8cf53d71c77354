#ifndef CLIPVISOR_CZSTD_SHIM_H
#define CLIPVISOR_CZSTD_SHIM_H
#include <zstd.h>

/// ZSTD_CONTENTSIZE_UNKNOWN: a macro with an arithmetic expression, re-exported as a value.
static const unsigned long long CZSTD_CONTENTSIZE_UNKNOWN = ZSTD_CONTENTSIZE_UNKNOWN;
/// ZSTD_CONTENTSIZE_ERROR: a macro with an arithmetic expression, re-exported as a value.
static const unsigned long long CZSTD_CONTENTSIZE_ERROR = ZSTD_CONTENTSIZE_ERROR;
#endif
