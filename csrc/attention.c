/* Causal multi-head self-attention, scaled dot product.
 *
 * q, k, v, out are (B,T,C); head h uses columns [h*hs, (h+1)*hs), hs = C/NH.
 * lse is (B,NH,T): the log-sum-exp of each row of scaled scores. The (T,T)
 * probability matrix is never stored: backward recomputes each row from q, k
 * and lse, which costs one more pass of dot products but keeps memory linear
 * in T. Work splits over (b, h) pairs, each owning its slices of dq, dk, dv,
 * so no two threads write the same float.
 */
#include <math.h>
#include <stdlib.h>
#include "kernel.h"

static inline float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float *y, float a, const float *x, int n) {
    #pragma omp simd
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* scores[s] = q_t . k_s * scale for s <= t; returns the row maximum. */
static inline float score_row(float *scores, const float *qt, const float *kh,
                              int t, int C, int hs, float scale) {
    float maxv = -INFINITY;
    for (int s = 0; s <= t; s++) {
        scores[s] = dot(qt, kh + (size_t)s * C, hs) * scale;
        if (scores[s] > maxv) maxv = scores[s];
    }
    return maxv;
}

void attention_forward(float *out, float *lse, const float *q, const float *k,
                       const float *v, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel
    {
        float *scores = scratch(2, (size_t)T);
        #pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++) {
                size_t base = (size_t)b * T * C + (size_t)h * hs;
                for (int t = 0; t < T; t++) {
                    const float *qt = q + base + (size_t)t * C;
                    float maxv = score_row(scores, qt, k + base, t, C, hs, scale);
                    float sum = 0.0f;
                    for (int s = 0; s <= t; s++) {
                        scores[s] = expf(scores[s] - maxv);
                        sum += scores[s];
                    }
                    float *ot = out + base + (size_t)t * C;
                    for (int i = 0; i < hs; i++) ot[i] = 0.0f;
                    float inv = 1.0f / sum;
                    for (int s = 0; s <= t; s++)
                        axpy(ot, scores[s] * inv, v + base + (size_t)s * C, hs);
                    lse[((size_t)b * NH + h) * T + t] = maxv + logf(sum);
                }
            }
    }
}

void attention_backward(float *dq, float *dk, float *dv, const float *dout,
                        const float *q, const float *k, const float *v,
                        const float *out, const float *lse,
                        int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel
    {
        float *p = scratch(2, (size_t)T);
        #pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++) {
                size_t base = (size_t)b * T * C + (size_t)h * hs;
                for (int t = 0; t < T; t++) {
                    size_t row = base + (size_t)t * C;
                    const float *qt = q + row, *dot_ = dout + row;
                    score_row(p, qt, k + base, t, C, hs, scale);
                    float l = lse[((size_t)b * NH + h) * T + t];
                    /* softmax backward: ds = p * (dp - sum(p * dp)), sum(p*dp) = dout_t . out_t */
                    float D = dot(dot_, out + row, hs);
                    for (int s = 0; s <= t; s++) {
                        size_t srow = base + (size_t)s * C;
                        float ps = expf(p[s] - l);
                        float ds = ps * (dot(dot_, v + srow, hs) - D) * scale;
                        axpy(dq + row, ds, k + srow, hs);
                        axpy(dk + srow, ds, qt, hs);
                        axpy(dv + srow, ps, dot_, hs);
                    }
                }
            }
    }
}
