/* Internal helpers shared by the kernel's .c files (not part of the cdef). */
#ifndef SQLGPT_KERNEL_H
#define SQLGPT_KERNEL_H

#include <stddef.h>
#include <stdint.h>
#include "sqlgpt.h"

/* Elements below which an elementwise loop runs on one thread: waking the
 * team and the barrier at its end cost more than such a loop's work. */
#define PARALLEL_MIN 65536L

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
typedef int vint __attribute__((vector_size(VLEN * 4), aligned(4)));

/* exp(x) in float with about 1 ulp of error, written with plain arithmetic so
 * that loops calling it vectorize (libm's expf is a scalar call): x = n ln2 + r,
 * |r| <= ln2/2, exp(r) by a degree-6 polynomial, times 2^n built in the
 * exponent bits. Inputs below -87.3 give 0 (as softmax wants), above 88
 * saturate at e^88, and NaN stays NaN. */
static inline float fast_expf(float x) {
    float in = x;
    if (!(x == x)) x = 0.0f;   /* NaN: computed on 0, returned as NaN below */
    if (x < -87.3f) x = -87.3f;
    if (x > 88.0f) x = 88.0f;  /* 2^n must stay below 2^128 */
    /* round to nearest by adding and removing 1.5 * 2^23 (libm's roundf is a
     * call, and would stop the loop from vectorizing) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667f + r * (0.041666667f +
              r * (0.0083333338f + r * 0.0013888889f)))));
    union { float f; int i; } scale = { .i = ((int)n + 127) << 23 };
    return in != in ? in : (x <= -87.3f ? 0.0f : p * scale.f);
}

/* An operand with strides, so a transposed matrix needs no copy:
 * element (r, p) is at a[r * rs + p * cs]. */
typedef struct { const float *a; long rs, cs; } Strided;

/* c (M,N) (+)= A (M,K) @ B (K,N), c row-major and contiguous: the tuned
 * matmul every product goes through (matmul.c). flags: GEMM_OVERWRITE
 * (c = instead of c +=), GEMM_RELU (c = max(c, 0) once the sum is done). */
enum { GEMM_OVERWRITE = 1, GEMM_RELU = 2 };
/* Skips the product when scratch cannot grow (noted for take_status). */
void gemm(float *c, Strided A, Strided B, int M, int N, int K, int flags);

/* One row of C normalized (norm.c), as training and decoding both do it;
 * each returns its rstd (layernorm also stores its mean). */
float layernorm_row(float *y, float *mean, const float *x, const float *weight,
                    const float *bias, int C, float eps);
float rmsnorm_row(float *y, const float *x, const float *weight, int C, float eps);

/* One position's heads (heads * hs floats) rotated in place by the angles
 * whose cos and sin (hs/2) are given; sign -1 rotates back (rope.c). */
void rope_row(float *x, const float *cos, const float *sin, int heads, int hs, float sign);
/* cos and sin (hs/2) of position t's angles. */
void rope_angles(float *cos, float *sin, int t, int hs, const ModelConfig *cfg);

/* GELU, tanh form (GPT-2's): 0.5 x (1 + tanh(u)) written as x * sigmoid(2u),
 * which has no cancellation where tanh(u) is near -1. Past |x| = GELU_TAIL
 * it is x or 0 to float precision (|gelu(-9)| < 1e-27), and there the cubic
 * would overflow and fast_expf saturate: the tails are exact instead. */
#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_TAIL 9.0f
static inline float gelu_sigmoid(float x) {
    /* selects, not early returns, so that loops over it vectorize; the
     * clamped c keeps the cubic finite where the tails are selected */
    float c = x < -GELU_TAIL ? -GELU_TAIL : x > GELU_TAIL ? GELU_TAIL : x;
    float s = 1.0f / (1.0f + fast_expf(-2.0f * GELU_K * (c + 0.044715f * c * c * c)));
    return x < -GELU_TAIL ? 0.0f : x > GELU_TAIL ? 1.0f : s;
}
static inline float gelu(float x) { return x * gelu_sigmoid(x); }
/* sigmoid(x) < 2e-35 below -80, where fast_expf(-x) would soon saturate */
static inline float sigmoid(float x) { return x < -80.0f ? 0.0f : 1.0f / (1.0f + fast_expf(-x)); }
static inline float silu(float x) { return x * sigmoid(x); }

/* Outputs j0..j1-1 of a quantized W (C,OC) at w (quant.c) for one row of
 * activations as quantize_q8 made them (xq, scales xs), into y[j - j0]. */
void quant_outputs(float *y, int j0, int j1, const void *w, const int8_t *xq, const float *xs,
                   int C, int OC, int bits, int G);
/* The same for n rows of activations (xq's rows 2C bytes apart, xs's C/G),
 * into y[r * ldy + j - j0]: the rows share each weight read. W arranged
 * (quant_arrange): j0, and j1 unless it is OC, are multiples of
 * quant_lanes() (whole blocks). */
void quant_tile(float *y, int ldy, int n, int j0, int j1, const void *w, const int8_t *xq,
                const float *xs, int C, int OC, int bits, int G);

/* Grows a per-thread scratch buffer; slot picks one of a few independent
 * buffers (one per use that may be live while another is). NULL when it
 * cannot grow (the failure is noted for take_status). */
enum {
    SCRATCH_PACKED_B,     /* matmul's packed B panels (shared by the team) */
    SCRATCH_DECODE_ROWS,  /* the decode step's rows (shared) */
    SCRATCH_HEADS,        /* attention's per-head work */
    SCRATCH_LOSS_ROWS,    /* the loss's per-row sums, in double */
    SCRATCH_DECODE_OWN,   /* the decode step's per-thread scores and rows */
    SCRATCH_SPLIT_K,      /* split-K partial sums */
    SCRATCH_PACKED_A,     /* matmul's packed A rows */
    SCRATCH_QUANT_ROWS,   /* quant_matmul's quantized activations */
    SCRATCH_SLOTS
};
float *scratch(int slot, size_t nfloats);
/* Note an allocation failure; the entry point's status, clearing the note. */
void note_nomem(void);
int take_status(void);

#endif
