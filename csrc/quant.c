/* Integer weights for decoding: int8 and int4 matrices in symmetric groups,
 * multiplied by activations quantized on the fly, with integer dot
 * products (llama.cpp's Q8_0 x Q8_0 and Q4_0 x Q8_0, llama2.c's runq.c).
 *
 * A quantized W (C,OC) is stored as its OC output rows (W's columns), each
 * C values in C/G groups of G along the input dimension, a float32 scale d
 * per group: value = d * q. The q of all rows come first, then all scales
 * (OC, C/G):
 *   int8 (Q8_0): d = amax / 127, q = rint(w / d) in [-127, 127], a byte each;
 *   int4 (Q4_0): d = m / -8 for m the group's value of largest magnitude, q
 *     = rint(w / d) clamped to [-8, 7], stored as q + 8 in a nibble: byte k
 *     of each run of 32 values (16 bytes) holds its element k (low nibble)
 *     and element k + 16 (high), as a Q4_0 block does.
 * Activations are quantized as int8 (Q8_0) per group of the same G, so each
 * group's dot product is an exact integer sum, scaled by both groups' d.
 *
 * The vector paths: AVX-512 VNNI (vpdpbusd), AVX2 (vpmaddubsw + vpmaddwd;
 * |q| <= 127 keeps the 16-bit pair sums from saturating), and a portable
 * loop. Each group's integer sum is exact on every path; the float sums of
 * the groups may round differently from one path to another.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernel.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

long quant_row_bytes(int C, int bits) {
    return bits == 4 ? C / 2 : C;
}

long quant_size(int C, int OC, int bits, int G) {
    return (long)OC * quant_row_bytes(C, bits) + (long)OC * (C / G) * (long)sizeof(float);
}

/* x (n) as int8 groups of G: q (2n), the values then their magnitudes (the
 * AVX2 product's unsigned operand), scales (n / G); d = amax / 127. */
void quantize_q8(int8_t *q, float *scales, const float *x, int n, int G) {
    for (int g = 0; g < n / G; g++) {
        const float *v = x + (size_t)g * G;
        float amax = 0.0f;
        for (int k = 0; k < G; k++) { /* not fmaxf: a libm call that stops vectorizing */
            float a = fabsf(v[k]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        scales[g] = d;
        for (int k = 0; k < G; k++) {
            float r = rintf(v[k] * inv); /* NaN (a NaN row) becomes 0: a defined cast */
            int8_t value = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r == r ? r : 0.0f);
            q[(size_t)g * G + k] = value;
            q[(size_t)n + (size_t)g * G + k] = (int8_t)(value < 0 ? -value : value);
        }
    }
}

#if defined(__AVX2__)
/* the 32 int8 values (q - 8) of one run of 32 int4 values, from its 16 bytes */
static inline __m256i unpack_q4(const uint8_t *p) {
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);
    return _mm256_sub_epi8(_mm256_and_si256(both, _mm256_set1_epi8(0x0f)), _mm256_set1_epi8(8));
}

/* the eight int32 partial sums of w . x over 32 int8 pairs, ax = |x|: the
 * unsigned-by-signed multiply takes |x| and w * sign(x) */
static inline __m256i dot32(__m256i w, __m256i x, __m256i ax) {
    __m256i sw = _mm256_sign_epi8(w, x);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sw);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1));
#endif
}

/* group g's weights as 32-value vectors (k: which 32 of the group) */
static inline __m256i weights32(const void *wq, int g, int k, int bits, int G) {
    return bits == 8
        ? _mm256_loadu_si256((const __m256i *)((const int8_t *)wq + (size_t)g * G + k))
        : unpack_q4((const uint8_t *)wq + (size_t)g * (G / 2) + k / 2);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX2__)
/* One output's dot product on AVX2, for constant bits and G (a multiple of
 * 32), so that the group loop unrolls: each group's exact int32 sum,
 * scaled by both scales, in two float accumulators. */
static inline __attribute__((always_inline)) float
dot_avx2(const void *wq, const float *ws, const int8_t *xq, const float *xs, int C, const int bits,
         const int G) {
    const int8_t *xa = xq + (size_t)C; /* |x| lies right after x (quantize_q8) */
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int g = 0; g < C / G; g++) {
        __m256i sum = _mm256_setzero_si256();
        for (int k = 0; k < G; k += 32) {
            size_t at = (size_t)g * G + k;
            sum = _mm256_add_epi32(sum, dot32(weights32(wq, g, k, bits, G),
                                              _mm256_loadu_si256((const __m256i *)(xq + at)),
                                              _mm256_loadu_si256((const __m256i *)(xa + at))));
        }
        acc[g & 1] = _mm256_fmadd_ps(_mm256_set1_ps(ws[g] * xs[g]), _mm256_cvtepi32_ps(sum),
                                     acc[g & 1]);
    }
    return hsum(_mm256_add_ps(acc[0], acc[1]));
}
#endif

/* The portable dot product: each group's int32 sum, scaled, in order. */
static float dot_portable(const void *wq, const float *ws, const int8_t *xq, const float *xs,
                          int C, int bits, int G) {
    float total = 0.0f;
    for (int g = 0; g < C / G; g++) {
        int32_t sum = 0;
        const int8_t *x = xq + (size_t)g * G;
        if (bits == 8) {
            const int8_t *w = (const int8_t *)wq + (size_t)g * G;
            for (int k = 0; k < G; k++) sum += (int32_t)w[k] * x[k];
        } else {
            const uint8_t *w = (const uint8_t *)wq + (size_t)g * (G / 2);
            for (int b = 0; b < G; b += 32, w += 16)
                for (int k = 0; k < 16; k++)
                    sum += ((w[k] & 0x0f) - 8) * x[b + k] + ((w[k] >> 4) - 8) * x[b + k + 16];
        }
        total += ws[g] * xs[g] * (float)sum;
    }
    return total;
}

#if defined(__AVX2__)
/* dot_avx2 for each format the package quantizes to */
#define SPECIALIZED(name, b, g)                                                          \
    static float name(const void *wq, const float *ws, const int8_t *xq, const float *xs, \
                      int C, int bits, int G) {                                          \
        (void)bits, (void)G;                                                             \
        return dot_avx2(wq, ws, xq, xs, C, b, g);                                        \
    }
SPECIALIZED(dot8_32, 8, 32)
SPECIALIZED(dot8_64, 8, 64)
SPECIALIZED(dot4_32, 4, 32)
SPECIALIZED(dot4_64, 4, 64)
#endif

/* Outputs j0..j1-1 of W for one activation row, into y[j - j0]. */
#define OUTPUTS(dot)                                                                      \
    for (int j = j0; j < j1; j++)                                                         \
        y[j - j0] = dot((const char *)w + (size_t)j * row, scales + (size_t)j * (C / G), xq, \
                        xs, C, bits, G)

void quant_outputs(float *y, int j0, int j1, const void *w, const int8_t *xq, const float *xs,
                   int C, int OC, int bits, int G) {
    long row = quant_row_bytes(C, bits);
    const float *scales = (const float *)((const char *)w + (size_t)OC * row);
#if defined(__AVX2__)
    /* one copy of the loop per format, each with its constants inlined */
    if (bits == 8 && G == 32) { OUTPUTS(dot8_32); return; }
    if (bits == 8 && G == 64) { OUTPUTS(dot8_64); return; }
    if (bits == 4 && G == 32) { OUTPUTS(dot4_32); return; }
    if (bits == 4 && G == 64) { OUTPUTS(dot4_64); return; }
#endif
    OUTPUTS(dot_portable);
}

int quant_matmul(float *y, const float *x, int n, const void *w, int C, int OC, int bits,
                 int G) {
    int8_t *xq = (int8_t *)scratch(SCRATCH_QUANT_ROWS, (size_t)n * C / 2 + (size_t)n * (C / G) + 1);
    if (!xq) return take_status();
    float *xs = (float *)(xq + 2 * (size_t)n * C + (-(size_t)n * C & 1) * 2);
    for (int r = 0; r < n; r++)
        quantize_q8(xq + 2 * (size_t)r * C, xs + (size_t)r * (C / G), x + (size_t)r * C, C, G);
    for (int r = 0; r < n; r++)
        quant_outputs(y + (size_t)r * OC, 0, OC, w, xq + 2 * (size_t)r * C,
                      xs + (size_t)r * (C / G), C, OC, bits, G);
    return take_status();
}
