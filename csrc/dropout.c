/* Inverted dropout: keep each element with probability 1-p and scale it by
 * 1/(1-p). The keep decision is a hash of (seed, index), so backward needs no
 * stored mask and the result is the same for any thread count. */
#include <stdint.h>
#include "kernel.h"

/* splitmix64 finalizer: a well-mixed 64-bit hash of the element counter. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline float keep_scale(uint64_t seed, long i, uint32_t threshold, float scale) {
    uint32_t r = (uint32_t)(mix64(seed + 0x9e3779b97f4a7c15ULL * (uint64_t)(i + 1)) >> 32);
    return r >= threshold ? scale : 0.0f;
}

/* out = residual + dropout(inp), residual may be NULL (then 0). */
static void apply_mask(float *out, const float *inp, const float *residual, long n, float p,
                       unsigned long long seed) {
    uint32_t threshold = (uint32_t)((double)p * 4294967296.0 > 4294967295.0
                                        ? 4294967295.0 : (double)p * 4294967296.0);
    float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    #pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        out[i] = (residual ? residual[i] : 0.0f) + inp[i] * keep_scale(seed, i, threshold, scale);
    }
}

void dropout_forward(float *out, const float *inp, long n, float p,
                     unsigned long long seed) {
    apply_mask(out, inp, NULL, n, p, seed);
}

void dropout_backward(float *dinp, const float *dout, long n, float p,
                      unsigned long long seed) {
    apply_mask(dinp, dout, NULL, n, p, seed);
}

/* out = x + dropout(branch): a sublayer's output joining the residual stream,
 * in one pass; p = 0 (evaluation) adds without hashing. */
void residual_dropout_forward(float *out, const float *x, const float *branch, long n,
                              float p, unsigned long long seed) {
    if (p > 0.0f) {
        apply_mask(out, branch, x, n, p, seed);
        return;
    }
    #pragma omp parallel for simd schedule(static) if (n > PARALLEL_MIN)
    for (long i = 0; i < n; i++) out[i] = x[i] + branch[i];
}
