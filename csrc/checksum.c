/* CRC-32 of checkpoint rows, as the database stores them: zlib's CRC-32
 * (reflected polynomial 0xEDB88320) over a row's data || m || v bytes.
 *
 * Computed here rather than by zlib through Python because a checkpoint is
 * thousands of short rows: three zlib calls per row cost more in call
 * overhead than in checksumming. Slicing-by-8 tables take 8 bytes per step;
 * rows are checksummed in parallel.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include "kernel.h"

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

#define LANES 4

/* Rows r0..r0+lanes-1 of (data || m || v), into out. */
static inline __attribute__((always_inline)) void
crc_rows(uint32_t *out, const float *const bufs[3], int r0, int cols, const int lanes) {
    uint32_t crc[LANES];
    const unsigned char *p[LANES];
    for (int l = 0; l < lanes; l++) crc[l] = ~0u;
    for (int b = 0; b < 3; b++) {
        for (int l = 0; l < lanes; l++)
            p[l] = (const unsigned char *)(bufs[b] + (size_t)(r0 + l) * cols);
        crc_lanes(crc, p, sizeof(float) * (size_t)cols, lanes);
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
