/* Internal helpers shared by the kernel's .c files (not part of the cdef). */
#ifndef SQLGPT_KERNEL_H
#define SQLGPT_KERNEL_H

#include <stddef.h>
#include "sqlgpt.h"

/* One SIMD register of floats, as a GCC vector type: the compiler maps it to
 * a zmm register when built with AVX-512, a ymm with AVX2, and to pairs of
 * narrower registers elsewhere, so the same source is fast where the package
 * is built and still correct everywhere. aligned(4) allows unaligned loads. */
#if defined(__AVX512F__)
#define VLEN 16
#elif defined(__AVX__)
#define VLEN 8
#else
#define VLEN 4
#endif
typedef float vfloat __attribute__((vector_size(VLEN * 4), aligned(4)));

/* Grows a per-thread scratch buffer; slot picks one of a few independent buffers. */
float *scratch(int slot, size_t nfloats);

#endif
