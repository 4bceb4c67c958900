/* CRC-32 of checkpoint rows, as the database stores them: zlib's CRC-32
 * (reflected polynomial 0xEDB88320) over a row's data || m || v bytes.
 *
 * Computed here rather than by zlib through Python because a checkpoint is
 * thousands of short rows: three zlib calls per row cost more in call
 * overhead than in checksumming. Where the CPU has carry-less multiply
 * (PCLMULQDQ), segments of 64 bytes and more are folded 64 bytes per step;
 * otherwise slicing-by-8 tables take 8 bytes per step. Rows are checksummed
 * in parallel.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include "kernel.h"
#if defined(__PCLMUL__) && defined(__SSE2__)
#include <immintrin.h>
#define CRC_FOLD 1
#endif

static uint32_t table[8][256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void make_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
}

/* Little-endian 32-bit word at p, on any host. */
static uint32_t load_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* One slicing-by-8 step: crc advanced over the 8 bytes at p. */
static inline uint32_t step8(uint32_t crc, const unsigned char *p) {
    uint32_t lo = crc ^ load_le32(p), hi = load_le32(p + 4);
    return table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^ table[5][(lo >> 16) & 0xff] ^
           table[4][lo >> 24] ^ table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^
           table[1][(hi >> 16) & 0xff] ^ table[0][hi >> 24];
}

/* The CRCs of `lanes` independent rows (crc[i] continued over n bytes at
 * p[i]), advanced in lockstep: one row's steps form a dependency chain of
 * table lookups, so interleaving rows keeps the core busy. crc values are
 * inverted (running) CRCs. */
static inline __attribute__((always_inline)) void
crc_lanes(uint32_t *crc, const unsigned char **p, size_t n, const int lanes) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < lanes; l++) crc[l] = step8(crc[l], p[l] + i);
    for (; i < n; i++)
        for (int l = 0; l < lanes; l++)
            crc[l] = table[0][(crc[l] ^ p[l][i]) & 0xff] ^ (crc[l] >> 8);
}

#ifdef CRC_FOLD
/* CRC folding with carry-less multiplies (as in Intel's "Fast CRC Computation
 * for Generic Polynomials Using PCLMULQDQ"): a 128-bit remainder moves forward
 * over D bits by multiplying its two halves by x^(D+32) and x^(D-32) mod P
 * (bit-reflected) and adding the data D bits on. Four remainders fold 64
 * bytes per step (D = 512), then fold into one (D = 128); the last 16 bytes
 * of remainder and the tail go through the tables, which is exact because
 * folding keeps the message's value mod P. The constants are the standard
 * ones for this polynomial (the Linux kernel's crc32-pclmul uses the same). */
static inline __m128i fold(__m128i x, __m128i k, __m128i next) {
    __m128i lo = _mm_clmulepi64_si128(x, k, 0x00), hi = _mm_clmulepi64_si128(x, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

static inline __m128i load128(const unsigned char *p) {
    return _mm_loadu_si128((const __m128i *)p);
}

/* crc (a running, inverted CRC) continued over n >= 64 bytes at p. */
static uint32_t crc_fold(uint32_t crc, const unsigned char *p, size_t n) {
    const __m128i by512 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);
    const __m128i by128 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);
    __m128i x0 = _mm_xor_si128(load128(p), _mm_cvtsi32_si128((int)crc));
    __m128i x1 = load128(p + 16), x2 = load128(p + 32), x3 = load128(p + 48);
    size_t i = 64;
    for (; i + 64 <= n; i += 64) {
        x0 = fold(x0, by512, load128(p + i));
        x1 = fold(x1, by512, load128(p + i + 16));
        x2 = fold(x2, by512, load128(p + i + 32));
        x3 = fold(x3, by512, load128(p + i + 48));
    }
    x0 = fold(fold(fold(x0, by128, x1), by128, x2), by128, x3);
    for (; i + 16 <= n; i += 16) x0 = fold(x0, by128, load128(p + i));
    unsigned char rest[16];
    _mm_storeu_si128((__m128i *)rest, x0);
    crc = step8(step8(0, rest), rest + 8);
    for (; i < n; i++) crc = table[0][(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return crc;
}
#endif

#define LANES 4

/* Rows r0..r0+lanes-1 of (data || m || v), into out. */
static inline __attribute__((always_inline)) void
crc_rows(uint32_t *out, const float *const bufs[3], int r0, int cols, const int lanes) {
    uint32_t crc[LANES];
    const unsigned char *p[LANES];
    for (int l = 0; l < lanes; l++) crc[l] = ~0u;
    for (int b = 0; b < 3; b++) {
        size_t n = sizeof(float) * (size_t)cols;
        for (int l = 0; l < lanes; l++)
            p[l] = (const unsigned char *)(bufs[b] + (size_t)(r0 + l) * cols);
#ifdef CRC_FOLD
        if (n >= 64) {
            for (int l = 0; l < lanes; l++) crc[l] = crc_fold(crc[l], p[l], n);
            continue;
        }
#endif
        crc_lanes(crc, p, n, lanes);
    }
    for (int l = 0; l < lanes; l++) out[r0 + l] = ~crc[l];
}

void crc32_rows(uint32_t *out, const float *data, const float *m, const float *v, int rows,
                int cols) {
    pthread_once(&table_once, make_table);
    const float *const bufs[3] = {data, m, v};
    int groups = rows / LANES;
    #pragma omp parallel for schedule(static) if ((long)rows * cols > 8192)
    for (int g = 0; g < groups; g++) crc_rows(out, bufs, g * LANES, cols, LANES);
    for (int r = groups * LANES; r < rows; r++) crc_rows(out, bufs, r, cols, 1);
}

uint32_t crc32_bytes(uint32_t crc, const void *bytes, size_t n) {
    pthread_once(&table_once, make_table);
    uint32_t c = ~crc;
    const unsigned char *p = bytes;
#ifdef CRC_FOLD
    if (n >= 64) return ~crc_fold(c, p, n);
#endif
    crc_lanes(&c, &p, n, 1);
    return ~c;
}
