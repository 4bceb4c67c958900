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
 * Decoders keep W arranged for their kernel (quant_arrange): each block of
 * LANES outputs (16 on AVX-512 VNNI, 8 on AVX2) interleaved so that one
 * vector holds 4 inputs of all of them (see the arranged layout below);
 * portable builds keep the rows.
 *
 * The vector paths: AVX-512 VNNI (vpdpbusd), AVX2 (vpmaddubsw + vpmaddwd;
 * |q| <= 127 keeps the 16-bit pair sums from saturating), and a portable
 * loop. Each group's integer sum is exact on every path; the float sums of
 * the groups may round differently from one path to another.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernel.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

long quant_row_bytes(int C, int bits) {
    return bits == 4 ? C / 2 : C;
}

long quant_size(int C, int OC, int bits, int G) {
    return (long)OC * quant_row_bytes(C, bits) + (long)OC * (C / G) * (long)sizeof(float);
}

/* The arranged layout (AVX-512 VNNI and AVX2 builds). Outputs [0,
 * arranged(OC)) go in blocks of LANES (16, or 8 on AVX2); the last OC %
 * LANES keep their rows where they are. A block takes the bytes of its
 * LANES rows, group after group of G inputs; a group is vectors of 4 LANES
 * bytes (one register), vector u holding inputs 4u..4u+3 of each output o at
 * bytes 4o..4o+3, ready for one vpdpbusd (AVX2: vpmaddubsw + vpmaddwd)
 * against those four activations broadcast:
 *   int8: q + OFFSET8, one vector per 4 inputs (VNNI: q + 128, unsigned;
 *     AVX2 keeps q signed, for its sign trick);
 *   int4: q + 8 in nibbles, a vector's low nibbles being step 2v and its
 *     high nibbles step 2v + 1 (inputs 8v..8v+3 and 8v+4..8v+7).
 * The blocks' scales follow in the same order, block by block, group by
 * group, LANES (one vector) each: IEEE halves where every one of them is a
 * half exactly (an import's Q8_0/Q4_0 scales always are: a ninth fewer
 * bytes to stream for int4), else float32. Halves are marked by HALF_SCALES
 * in the last float32 slot they leave free: a NaN, which a float32 scale
 * never is (the loaders refuse non-finite scales). Each output's sum lands
 * in its own lane: no horizontal sums, and one float scaling per group for
 * LANES outputs. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LANES 16
#define OFFSET8 128
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define LANES 8
#define OFFSET8 0
#else
#define LANES 0
#endif
#define HALF_SCALES 0x7fc5ca1eu

int quant_lanes(void) {
    return LANES;
}

static int arranged(int OC) {
    return LANES ? OC - OC % LANES : 0;
}

#if LANES
/* Where input c of lane o lies in its arranged block: a byte offset, and
 * *shift, the bits to shift an int4 byte right by. */
static size_t arranged_at(int o, int c, int bits, int G, int *shift) {
    int g = c / G, k = c % G, u = k / 4;
    *shift = bits == 4 && u % 2 ? 4 : 0;
    return (size_t)g * LANES * G * bits / 8 + (size_t)(bits == 8 ? u : u / 2) * 4 * LANES +
           4 * (size_t)o + k % 4;
}

/* The first arranged scale, and whether they are halves. */
static const void *arranged_scales(const void *w, int C, int OC, int bits, int G, int *half) {
    const char *scales = (const char *)w + (size_t)OC * quant_row_bytes(C, bits);
    uint32_t mark;
    memcpy(&mark, scales + ((size_t)arranged(OC) * (C / G) - 1) * 4, 4);
    *half = mark == HALF_SCALES;
    return scales;
}
#endif

/* Value c of a row as stored (q: int8 bytes, or Q4_0's nibbles). */
static int row_value(const uint8_t *q, int c, int bits) {
    return bits == 8 ? (int8_t)q[c] : ((q[c / 32 * 16 + c % 16] >> (c % 32 < 16 ? 0 : 4)) & 15) - 8;
}

#if LANES
/* Each block's values, in place (blocks share nothing: a thread each). */
static int arrange_values(uint8_t *q, int C, int blocks, int bits, int G) {
    long row = quant_row_bytes(C, bits);
    size_t bytes = (size_t)LANES * row;
    int failed = 0;
    #pragma omp parallel reduction(|:failed)
    {
        uint8_t *rows = malloc(bytes);
        failed = rows == NULL;
        #pragma omp for schedule(static)
        for (int b = 0; b < blocks; b++) {
            if (!rows) continue;
            uint8_t *block = q + (size_t)b * bytes;
            memcpy(rows, block, bytes);
            memset(block, 0, bytes);
            for (int o = 0; o < LANES; o++)
                for (int c = 0; c < C; c++) {
                    int shift, value = row_value(rows + (size_t)o * row, c, bits);
                    size_t at = arranged_at(o, c, bits, G, &shift); /* sets shift first */
                    block[at] |= (uint8_t)((unsigned)(value + (bits == 8 ? OFFSET8 : 8)) << shift);
                }
        }
        free(rows);
    }
    return failed;
}

/* The blocks' scales, in place, block after block: a block's halves end
 * where its float32 scales began, so none is written over before it is read. */
static int arrange_scales(float *scales, int blocks, int groups) {
    size_t n = (size_t)blocks * LANES * groups, per_block = (size_t)LANES * groups;
    int half = 1;
    for (size_t i = 0; i < n && half; i++) half = (float)(_Float16)scales[i] == scales[i];
    float *was = malloc(per_block * sizeof(float));
    if (!was) return 1;
    for (int b = 0; b < blocks; b++) {
        memcpy(was, scales + b * per_block, per_block * sizeof(float));
        for (int o = 0; o < LANES; o++)
            for (int g = 0; g < groups; g++) {
                size_t at = b * per_block + (size_t)g * LANES + o;
                float value = was[(size_t)o * groups + g];
                if (half) ((_Float16 *)scales)[at] = (_Float16)value;
                else scales[at] = value;
            }
    }
    free(was);
    if (half) memcpy(scales + n - 1, &(uint32_t){HALF_SCALES}, 4);
    return 0;
}
#endif

int quant_arrange(void *w, int C, int OC, int bits, int G) {
#if LANES
    if (arranged(OC) == 0) return SQLGPT_OK;
    float *scales = (float *)((char *)w + (size_t)OC * quant_row_bytes(C, bits));
    int blocks = arranged(OC) / LANES;
    if (arrange_values(w, C, blocks, bits, G) || arrange_scales(scales, blocks, C / G))
        return SQLGPT_NOMEM;
#else
    (void)w, (void)C, (void)OC, (void)bits, (void)G;
#endif
    return SQLGPT_OK;
}

void quant_row_values(float *out, const void *w, int C, int OC, int bits, int G, int j) {
    long row_bytes = quant_row_bytes(C, bits);
#if LANES
    if (j < arranged(OC)) {
        int b = j / LANES, o = j % LANES, groups = C / G, half;
        const uint8_t *block = (const uint8_t *)w + (size_t)b * LANES * row_bytes;
        const void *scales = arranged_scales(w, C, OC, bits, G, &half);
        size_t first = (size_t)b * LANES * groups + o;
        for (int c = 0; c < C; c++) {
            int shift;
            size_t byte = arranged_at(o, c, bits, G, &shift); /* sets shift first */
            int stored = block[byte] >> shift;
            int value = bits == 8 ? (int8_t)(uint8_t)(stored - OFFSET8) : (stored & 15) - 8;
            size_t at = first + (size_t)(c / G) * LANES;
            float scale = half ? (float)((const _Float16 *)scales)[at]
                               : ((const float *)scales)[at];
            out[c] = scale * (float)value;
        }
        return;
    }
#endif
    const uint8_t *q = (const uint8_t *)w + (size_t)j * row_bytes;
    const float *scales = (const float *)((const char *)w + (size_t)OC * row_bytes) +
                          (size_t)j * (C / G);
    for (int c = 0; c < C; c++) out[c] = scales[c / G] * (float)row_value(q, c, bits);
}

/* x (n) as int8 groups of G: q (2n), the values then their magnitudes (the
 * AVX2 product's unsigned operand), scales (n / G); d = amax / 127. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
/* Group g of x on AVX-512, 16 values at a time: the same values and scales
 * as the loop below (rint rounds to nearest even in both; a NaN's
 * conversion is masked to 0). */
static void quantize_group512(int8_t *q, float *scales, const float *x, int n, int g, int G) {
    const float *v = x + (size_t)g * G;
    __m512 amax = _mm512_setzero_ps();
    for (int k = 0; k < G; k += 16) /* a NaN loses */
        amax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(v + k)), amax);
    float d = _mm512_reduce_max_ps(amax) / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    scales[g] = d;
    for (int k = 0; k < G; k += 16) {
        __m512 f = _mm512_mul_ps(_mm512_loadu_ps(v + k), _mm512_set1_ps(inv));
        __mmask16 number = _mm512_cmp_ps_mask(f, f, _CMP_ORD_Q);
        f = _mm512_min_ps(_mm512_max_ps(f, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
        __m512i r = _mm512_maskz_cvt_roundps_epi32(number, f,
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(q + (size_t)g * G + k), _mm512_cvtepi32_epi8(r));
        _mm_storeu_si128((__m128i *)(q + (size_t)n + (size_t)g * G + k),
                         _mm512_cvtepi32_epi8(_mm512_abs_epi32(r)));
    }
}
#endif

#if defined(__AVX2__) && !(defined(__AVX512F__) && defined(__AVX512BW__))
/* The same on AVX2, 32 values at a time (G a multiple of 32): four vectors
 * of int32 packed to bytes (packs interleave 128-bit lanes; the permute
 * puts them back in order). */
static void quantize_group256(int8_t *q, float *scales, const float *x, int n, int g, int G) {
    const float *v = x + (size_t)g * G;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < G; k += 8) /* a NaN loses */
        amax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(v + k), magnitude), amax);
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    float d = _mm_cvtss_f32(m) / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    scales[g] = d;
    for (int k = 0; k < G; k += 32) {
        __m256i r[4];
        for (int i = 0; i < 4; i++) {
            __m256 f = _mm256_mul_ps(_mm256_loadu_ps(v + k + 8 * i), _mm256_set1_ps(inv));
            __m256 number = _mm256_cmp_ps(f, f, _CMP_ORD_Q);
            f = _mm256_min_ps(_mm256_max_ps(f, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
            f = _mm256_round_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r[i] = _mm256_and_si256(_mm256_cvtps_epi32(f), _mm256_castps_si256(number));
        }
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]),
                                           _mm256_packs_epi32(r[2], r[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + (size_t)g * G + k), bytes);
        _mm256_storeu_si256((__m256i *)(q + (size_t)n + (size_t)g * G + k),
                            _mm256_abs_epi8(bytes));
    }
}
#endif

void quantize_q8(int8_t *q, float *scales, const float *x, int n, int G) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (G % 16 == 0) {
        for (int g = 0; g < n / G; g++) quantize_group512(q, scales, x, n, g, G);
        return;
    }
#elif defined(__AVX2__)
    if (G % 32 == 0) {
        for (int g = 0; g < n / G; g++) quantize_group256(q, scales, x, n, g, G);
        return;
    }
#endif
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

#define OUTPUT_BLOCK 64 /* outputs whose weights stay in cache while every row passes */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* Tiles of rows x outputs on AVX-512 VNNI, 64 input values (two runs of 32)
 * at a time. vpdpbusd multiplies unsigned by signed bytes, so the weights
 * go in offset to unsigned (int8: q + 128, a flip of the top bit; int4: the
 * stored nibble q + 8) and each product's offset is taken back by starting
 * the sums at -offset * (the activations' sums), once per row and run pair
 * (llama.cpp's and tinyBLAS's sign tricks cost an operation per product).
 * Each lane's integer sum stays exact; a row's activations and the
 * corrections are prepared once for all the tile's outputs, and a tile's
 * weights once for all its rows, so a prompt reads each weight from memory
 * once per block of rows instead of once per row. */
#define TILE_ROWS 4 /* and the switch in tiles512 below */
#define TILE_OUTPUTS 4
#define AHEAD 16 /* outputs: how far ahead one row's decoding fetches */

/* Which run of 32 each int32 lane sums (0: the first, 1: the second): int8
 * pairs are two runs of 32 bytes; an int4 pair is 32 bytes whose low nibbles
 * (the runs' values 0-15) come before their high nibbles (16-31). */
static inline __m512i lane_runs(int bits) {
    return bits == 8 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                     : _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
}

/* The scales of pair p's two runs, spread over the lanes that sum them; a
 * last pair of one run (whole) reads one scale. */
static inline __m512 pair_scales(const float *s, int p, int whole, __m512i runs, const int G) {
    __m128 two;
    if (G == 64) two = _mm_set1_ps(s[p]);
    else if (whole) { /* two floats, 4-byte aligned: memcpy, not a double's load */
        long long both;
        memcpy(&both, s + 2 * p, sizeof(both));
        two = _mm_castsi128_ps(_mm_cvtsi64_si128(both));
    } else two = _mm_load_ss(s + 2 * p);
    return _mm512_permutexvar_ps(runs, _mm512_castps128_ps512(two));
}

/* One row's activations for pair p, in the weights' lane order, and the
 * sums the offset products start from. */
static inline void pair_row(__m512i *x, __m512i *start, const int8_t *xq, int p, int whole,
                            const int bits) {
    __m512i v = _mm512_maskz_loadu_epi8(whole ? ~0ULL : 0xffffffffULL, xq + 64 * (size_t)p);
    if (bits == 4) v = _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0));
    __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), v);
    *x = v;
    *start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, bits == 8 ? 7 : 3));
}

/* Output row wq's offset weights for pair p. */
static inline __m512i pair_weights(const void *wq, int p, int whole, const int bits) {
    if (bits == 8)
        return _mm512_xor_si512(
            _mm512_maskz_loadu_epi8(whole ? ~0ULL : 0xffffffffULL, (const int8_t *)wq + 64 * (size_t)p),
            _mm512_set1_epi8((char)0x80));
    __m256i v = _mm256_maskz_loadu_epi8(whole ? 0xffffffffU : 0xffffU,
                                        (const uint8_t *)wq + 32 * (size_t)p);
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(0x0f));
}

/* y[r * ldy + o] for R rows of xq (stride 2C) and O outputs from row j of w:
 * every (row, output) sum in its own accumulator. */
static inline __attribute__((always_inline)) void
tile512(float *y, int ldy, const int8_t *xq, const float *xs, const char *w, const float *ws,
        int j, int C, const int R, const int O, const int bits, const int G) {
    long row = quant_row_bytes(C, bits);
    int pairs = (C + 63) / 64, groups = C / G;
    __m512i runs = lane_runs(bits);
    __m512 acc[TILE_ROWS][TILE_OUTPUTS];
    for (int r = 0; r < R; r++)
        for (int o = 0; o < O; o++) acc[r][o] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        int whole = 64 * p + 64 <= C;
        __m512i x[TILE_ROWS], start[TILE_ROWS];
        __m512 xscale[TILE_ROWS];
        for (int r = 0; r < R; r++) {
            pair_row(&x[r], &start[r], xq + 2 * (size_t)r * C, p, whole, bits);
            xscale[r] = pair_scales(xs + (size_t)r * groups, p, whole, runs, G);
        }
        for (int o = 0; o < O; o++) {
            if (R == 1) /* one row's decoding streams the weights: ask for them early */
                _mm_prefetch(w + (size_t)(j + o + AHEAD) * row + (bits == 8 ? 64 : 32) * (size_t)p,
                             _MM_HINT_T0);
            __m512i wv = pair_weights(w + (size_t)(j + o) * row, p, whole, bits);
            __m512 wscale = pair_scales(ws + (size_t)(j + o) * groups, p, whole, runs, G);
            for (int r = 0; r < R; r++) {
                __m512 sum = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start[r], wv, x[r]));
                acc[r][o] = _mm512_fmadd_ps(sum, _mm512_mul_ps(xscale[r], wscale), acc[r][o]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int o = 0; o < O; o++) y[(size_t)r * ldy + o] = _mm512_reduce_add_ps(acc[r][o]);
}

/* Rows r0.. (R of them, 1 to TILE_ROWS) against outputs j0..j1-1. */
static inline __attribute__((always_inline)) void
rows512(float *y, int ldy, const int8_t *xq, const float *xs, const char *w, const float *ws,
        int j0, int j1, int C, const int R, const int bits, const int G) {
    int j = j0;
    /* one row's int8 decoding reads output after output: each row's bytes in
     * order, one stream (tiles of outputs interleave four rows' lines, and
     * that ran at half the memory's speed); int4 keeps its tiles, whose
     * shared activations save more than the interleaving costs */
    for (; (R > 1 || bits == 4) && j + TILE_OUTPUTS <= j1; j += TILE_OUTPUTS)
        tile512(y + (j - j0), ldy, xq, xs, w, ws, j, C, R, TILE_OUTPUTS, bits, G);
    for (; j < j1; j++) tile512(y + (j - j0), ldy, xq, xs, w, ws, j, C, R, 1, bits, G);
}

/* quant_tile for one format: blocks of outputs, each passed by every row. */
static inline __attribute__((always_inline)) void
tiles512(float *y, int ldy, int n, int j0, int j1, const void *w, const int8_t *xq,
         const float *xs, int C, int OC, const int bits, const int G) {
    const float *ws = (const float *)((const char *)w + (size_t)OC * quant_row_bytes(C, bits));
    for (int b = j0; b < j1; b += OUTPUT_BLOCK) {
        int e = b + OUTPUT_BLOCK < j1 ? b + OUTPUT_BLOCK : j1, r = 0;
        for (; r + TILE_ROWS <= n; r += TILE_ROWS)
            rows512(y + (size_t)r * ldy + (b - j0), ldy, xq + 2 * (size_t)r * C,
                    xs + (size_t)r * (C / G), w, ws, b, e, C, TILE_ROWS, bits, G);
        const int8_t *xr = xq + 2 * (size_t)r * C;
        const float *sr = xs + (size_t)r * (C / G);
        float *yr = y + (size_t)r * ldy + (b - j0);
        switch (n - r) { /* the last rows: fewer than TILE_ROWS (at most 3) */
        case 3: rows512(yr, ldy, xr, sr, w, ws, b, e, C, 3, bits, G); break;
        case 2: rows512(yr, ldy, xr, sr, w, ws, b, e, C, 2, bits, G); break;
        case 1: rows512(yr, ldy, xr, sr, w, ws, b, e, C, 1, bits, G); break;
        default: break;
        }
    }
}

/* Four inputs of R rows (x + 2C r: their activations, broadcast) times the
 * matching vectors of NB blocks, into the rows' integer sums. */
static inline __attribute__((always_inline)) void
arranged_step(__m512i sum[4][2], const __m512i *weights, const int8_t *x, int C, const int R,
              const int NB) {
    for (int r = 0; r < R; r++) {
        int32_t four;
        memcpy(&four, x + 2 * (size_t)r * C, 4);
        __m512i xb = _mm512_set1_epi32(four);
        for (int b = 0; b < NB; b++) sum[r][b] = _mm512_dpbusd_epi32(sum[r][b], weights[b], xb);
    }
}

/* The arranged kernel: R rows (1-4) times NB blocks of 16 outputs (1-2),
 * from block wb (its scales ws, halves or float32); sums[r * groups + g]
 * is row r's group g sum, from which the offset products start. Each lane's integer sum is
 * exact, and each output's float sum takes the groups in order whatever R
 * and NB are: a row's result does not depend on the rows beside it. */
static inline __attribute__((always_inline)) void
arranged_tile(float *y, int ldy, const int8_t *xq, const float *xs, const int32_t *sums,
              const uint8_t *wb, const char *ws, int C, const int R, const int NB,
              const int bits, const int G, const int half) {
    int groups = C / G;
    size_t block_bytes = (size_t)LANES * quant_row_bytes(C, bits);
    size_t group_bytes = LANES * G * bits / 8, block_scales = (size_t)LANES * groups;
    __m512 acc[4][2];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i sum[4][2], low[2], high[2];
        for (int r = 0; r < R; r++) {
            __m512i start = _mm512_set1_epi32(-(bits == 8 ? 128 : 8) * sums[r * groups + g]);
            for (int b = 0; b < NB; b++) sum[r][b] = start;
        }
        const uint8_t *wg = wb + (size_t)g * group_bytes;
        const int8_t *xg = xq + (size_t)g * G;
        if (bits == 8)
            for (int u = 0; u < G / 4; u++) { /* inputs 4u..4u+3 of the group */
                for (int b = 0; b < NB; b++)
                    low[b] = _mm512_loadu_si512(wg + b * block_bytes + 64 * u);
                arranged_step(sum, low, xg + 4 * u, C, R, NB);
            }
        else
            for (int v = 0; v < G / 8; v++) { /* inputs 8v..8v+3 low, 8v+4..8v+7 high */
                for (int b = 0; b < NB; b++) {
                    __m512i both = _mm512_loadu_si512(wg + b * block_bytes + 64 * v);
                    low[b] = _mm512_and_si512(both, _mm512_set1_epi8(0x0f));
                    high[b] = _mm512_and_si512(_mm512_srli_epi16(both, 4), _mm512_set1_epi8(0x0f));
                }
                arranged_step(sum, low, xg + 8 * v, C, R, NB);
                arranged_step(sum, high, xg + 8 * v + 4, C, R, NB);
            }
        for (int b = 0; b < NB; b++) {
            size_t at = b * block_scales + (size_t)g * LANES;
            __m512 scale = half
                ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ws + 2 * at)))
                : _mm512_loadu_ps(ws + 4 * at);
            for (int r = 0; r < R; r++) {
                __m512 both = _mm512_mul_ps(scale, _mm512_set1_ps(xs[(size_t)r * groups + g]));
                acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][b]), both, acc[r][b]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) _mm512_storeu_ps(y + (size_t)r * ldy + b * LANES, acc[r][b]);
}

#endif

/* A kernel for n rows and outputs [j0, j1) of W, in one format. */
typedef void Tiles(float *y, int ldy, int n, int j0, int j1, const void *w, const int8_t *xq,
                   const float *xs, int C, int OC);

/* kernel(name, bits, G) for each format the package quantizes to, and
 * family_for(bits, G), the one for a format (NULL: none). */
#define EACH_FORMAT(family, kernel)                                                       \
    kernel(family##8_32, 8, 32)                                                           \
    kernel(family##8_64, 8, 64)                                                           \
    kernel(family##4_32, 4, 32)                                                           \
    kernel(family##4_64, 4, 64)                                                           \
    static Tiles *family##_for(int bits, int G) {                                         \
        return bits == 8 ? (G == 32 ? family##8_32 : G == 64 ? family##8_64 : NULL)      \
                         : (G == 32 ? family##4_32 : G == 64 ? family##4_64 : NULL);      \
    }

#if LANES == 8
/* The four activations of row r at x (x + C: their magnitudes), broadcast. */
static inline __m256i four_of(const int8_t *x) {
    int32_t four;
    memcpy(&four, x, 4);
    return _mm256_set1_epi32(four);
}

/* The arranged kernel on AVX2 for R rows (1-4) and one block of 8 outputs
 * from wb (its scales ws): vpmaddubsw multiplies unsigned by signed bytes
 * into 16-bit pair sums and vpmaddwd adds the pairs. int4's nibbles (q + 8)
 * go in as the unsigned side and the offset is taken back by starting from
 * -8 times the group's activation sum (|pair| <= 2 * 15 * 127); int8 takes
 * |x| times q * sign(x) (|pair| <= 2 * 127 * 127: no saturation). Each
 * lane's sum is exact and each output's float sum takes the groups in
 * order, whatever R is. */
static inline __attribute__((always_inline)) void
arranged_tile(float *y, int ldy, const int8_t *xq, const float *xs, const int32_t *sums,
              const uint8_t *wb, const char *ws, int C, const int R, const int NB,
              const int bits, const int G, const int half) {
    (void)NB; /* one block at a time: two rows' worth of registers would spill */
    int groups = C / G;
    size_t group_bytes = LANES * G * bits / 8;
    const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(0x0f);
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i sum[4];
        for (int r = 0; r < R; r++)
            sum[r] = bits == 8 ? _mm256_setzero_si256() : _mm256_set1_epi32(-8 * sums[r * groups + g]);
        const uint8_t *wg = wb + (size_t)g * group_bytes;
        const int8_t *xg = xq + (size_t)g * G;
        if (bits == 8)
            for (int u = 0; u < G / 4; u++) { /* inputs 4u..4u+3 of the group */
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wg + 32 * u));
                for (int r = 0; r < R; r++) {
                    const int8_t *x = xg + 2 * (size_t)r * C + 4 * u;
                    __m256i pairs = _mm256_maddubs_epi16(four_of(x + C),
                                                         _mm256_sign_epi8(wv, four_of(x)));
                    sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(pairs, ones));
                }
            }
        else
            for (int v = 0; v < G / 8; v++) { /* inputs 8v..8v+3 low, 8v+4..8v+7 high */
                __m256i both = _mm256_loadu_si256((const __m256i *)(wg + 32 * v));
                __m256i low = _mm256_and_si256(both, nibble);
                __m256i high = _mm256_and_si256(_mm256_srli_epi16(both, 4), nibble);
                for (int r = 0; r < R; r++) {
                    const int8_t *x = xg + 2 * (size_t)r * C + 8 * v;
                    __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, four_of(x)),
                                                     _mm256_maddubs_epi16(high, four_of(x + 4)));
                    sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(pairs, ones));
                }
            }
        size_t at = (size_t)g * LANES;
        __m256 scale = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ws + 2 * at)))
                            : _mm256_loadu_ps((const float *)ws + at);
        for (int r = 0; r < R; r++) {
            __m256 both = _mm256_mul_ps(scale, _mm256_set1_ps(xs[(size_t)r * groups + g]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), both, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(y + (size_t)r * ldy, acc[r]);
}
#endif

#if LANES
/* Each of R rows' group sums of its activations. */
static void group_sums(int32_t *sums, const int8_t *xq, int R, int C, int G) {
    for (int r = 0; r < R; r++)
        for (int g = 0; g < C / G; g++) {
            int32_t total = 0;
            for (int k = 0; k < G; k++) total += xq[2 * (size_t)r * C + (size_t)g * G + k];
            sums[r * (C / G) + g] = total;
        }
}

/* R rows against the arranged blocks of outputs [j0, j1) (multiples of
 * LANES), two blocks at a time for a tile of rows on AVX-512 (AVX2's 16
 * registers hold one); one row's decoding goes block by block, reading the
 * weights as one stream in order (two blocks at a time read two streams,
 * and that ran at nine tenths the memory's speed). */
static inline __attribute__((always_inline)) void
arranged_rows(float *y, int ldy, const int8_t *xq, const float *xs, const int32_t *sums,
              const uint8_t *w, const char *ws, int j0, int j1, int C, const int R,
              const int bits, const int G, const int half) {
    size_t row = quant_row_bytes(C, bits), scale_bytes = (size_t)(C / G) * (half ? 2 : 4);
    int j = j0;
    for (; LANES == 16 && R > 1 && j + 2 * LANES <= j1; j += 2 * LANES)
        arranged_tile(y + (j - j0), ldy, xq, xs, sums, w + j * row, ws + j * scale_bytes, C, R,
                      2, bits, G, half);
    for (; j < j1; j += LANES)
        arranged_tile(y + (j - j0), ldy, xq, xs, sums, w + j * row, ws + j * scale_bytes, C, R,
                      1, bits, G, half);
}

/* Outputs [j0, j1) of the arranged ones (multiples of LANES) for n rows:
 * blocks of OUTPUT_BLOCK outputs, each passed by every row four at a time. */
static inline __attribute__((always_inline)) void
arranged_tiles(float *y, int ldy, int n, int j0, int j1, const void *w, const int8_t *xq,
               const float *xs, int C, int OC, const int bits, const int G, const int half) {
    const char *ws = (const char *)w + (size_t)OC * quant_row_bytes(C, bits);
    int groups = C / G;
    int32_t sums[4 * groups];
    for (int b = j0; b < j1; b += OUTPUT_BLOCK) {
        int e = b + OUTPUT_BLOCK < j1 ? b + OUTPUT_BLOCK : j1;
        for (int r = 0; r < n; r += 4) {
            int R = n - r < 4 ? n - r : 4;
            const int8_t *xr = xq + 2 * (size_t)r * C;
            const float *sr = xs + (size_t)r * groups;
            float *yr = y + (size_t)r * ldy + (b - j0);
            group_sums(sums, xr, R, C, G);
            switch (R) {
            case 4: arranged_rows(yr, ldy, xr, sr, sums, w, ws, b, e, C, 4, bits, G, half);
                    break;
            case 3: arranged_rows(yr, ldy, xr, sr, sums, w, ws, b, e, C, 3, bits, G, half);
                    break;
            case 2: arranged_rows(yr, ldy, xr, sr, sums, w, ws, b, e, C, 2, bits, G, half);
                    break;
            default: arranged_rows(yr, ldy, xr, sr, sums, w, ws, b, e, C, 1, bits, G, half);
                    break;
            }
        }
    }
}

#define ARRANGED(name, b, g)                                                              \
    static void name(float *y, int ldy, int n, int j0, int j1, const void *w,             \
                     const int8_t *xq, const float *xs, int C, int OC) {                  \
        int half;                                                                         \
        arranged_scales(w, C, OC, b, g, &half);                                           \
        if (half) arranged_tiles(y, ldy, n, j0, j1, w, xq, xs, C, OC, b, g, 1);           \
        else arranged_tiles(y, ldy, n, j0, j1, w, xq, xs, C, OC, b, g, 0);                \
    }
EACH_FORMAT(arranged, ARRANGED)
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TILES(name, b, g)                                                                 \
    static void name(float *y, int ldy, int n, int j0, int j1, const void *w,             \
                     const int8_t *xq, const float *xs, int C, int OC) {                  \
        tiles512(y, ldy, n, j0, j1, w, xq, xs, C, OC, b, g);                              \
    }
EACH_FORMAT(tiles, TILES)
#endif

/* Outputs [j0, j1) of n rows from W's rows as stored (not arranged). */
static void stored_rows(float *y, int ldy, int n, int j0, int j1, const void *w, const int8_t *xq,
                        const float *xs, int C, int OC, int bits, int G) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    Tiles *rows = tiles_for(bits, G);
    if (rows) {
        rows(y, ldy, n, j0, j1, w, xq, xs, C, OC);
        return;
    }
#endif
    for (int r = 0; r < n; r++)
        quant_outputs(y + (size_t)r * ldy, j0, j1, w, xq + 2 * (size_t)r * C,
                      xs + (size_t)r * (C / G), C, OC, bits, G);
}

void quant_tile(float *y, int ldy, int n, int j0, int j1, const void *w, const int8_t *xq,
                const float *xs, int C, int OC, int bits, int G) {
#if LANES
    Tiles *blocks = arranged_for(bits, G);
    int A = blocks ? arranged(OC) : 0; /* the arranged outputs, then the last OC % LANES */
    if (j0 < A) {
        blocks(y, ldy, n, j0, j1 < A ? j1 : A, w, xq, xs, C, OC);
        if (j1 <= A) return;
        y += A - j0;
        j0 = A;
    }
#endif
    stored_rows(y, ldy, n, j0, j1, w, xq, xs, C, OC, bits, G);
}

int quant_matmul(float *y, const float *x, int n, const void *w, int C, int OC, int bits,
                 int G) {
    int8_t *xq = (int8_t *)scratch(SCRATCH_QUANT_ROWS, (size_t)n * C / 2 + (size_t)n * (C / G) + 1);
    if (!xq) return take_status();
    float *xs = (float *)(xq + 2 * (size_t)n * C + (-(size_t)n * C & 1) * 2);
    for (int r = 0; r < n; r++)
        quantize_q8(xq + 2 * (size_t)r * C, xs + (size_t)r * (C / G), x + (size_t)r * C, C, G);
    void *mine = malloc((size_t)quant_size(C, OC, bits, G)); /* w as stored: arrange a copy */
    if (!mine || quant_arrange(memcpy(mine, w, (size_t)quant_size(C, OC, bits, G)), C, OC, bits,
                               G) != SQLGPT_OK) {
        free(mine);
        take_status();
        return SQLGPT_NOMEM;
    }
    quant_tile(y, OC, n, 0, OC, mine, xq, xs, C, OC, bits, G);
    free(mine);
    return take_status();
}
