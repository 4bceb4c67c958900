/* Causal multi-head self-attention, scaled dot product.
 *
 * q, k, v, out are (B,T,C); head h uses columns [h*hs, (h+1)*hs), hs = C/NH.
 * lse is (B,NH,T): the log-sum-exp of each row of scaled scores. The (T,T)
 * probability matrix is never stored: backward recomputes each row from q, k
 * and lse, which costs one more pass of dot products but keeps memory linear
 * in T.
 *
 * Work splits over (b, h) pairs. Each copies its head's slices into
 * contiguous per-thread scratch, k and v also transposed to (hs,T), so that
 * a row of scores is hs vectorized sweeps over keys (not T dot products of
 * length hs, which for hs = 16 would be all horizontal reductions), and
 * writes its own slices of dq, dk, dv: no two threads touch the same float.
 */
#include <math.h>
#include <string.h>
#include "kernel.h"

/* The per-(b,h) working set, all contiguous. */
typedef struct {
    float *q, *k, *v;   /* (T,hs) */
    float *kt, *vt;     /* (hs,T) */
    float *dk, *dv;     /* (T,hs) */
    float *row, *p;     /* (Tp) */
    float *acc;         /* (hs): one output row being summed */
} HeadScratch;

/* Sweeps keep U independent vector accumulators in flight (an FMA's result
 * is ready only a few cycles later). Transposed copies have rows of Tp >= T
 * floats, a whole number of U-vector blocks, so a sweep over keys may read
 * (and ignore) a partial block past t. */
#define U 4
static inline int padded(int T) { return (T + U * VLEN - 1) / (U * VLEN) * (U * VLEN); }

static HeadScratch head_scratch(int T, int hs) {
    size_t th = (size_t)padded(T) * hs;
    size_t tp = padded(T);
    float *base = scratch(2, 7 * th + 2 * tp + hs);
    HeadScratch s = {base, base + th, base + 2 * th, base + 3 * th, base + 4 * th,
                     base + 5 * th, base + 6 * th, base + 7 * th, base + 7 * th + tp,
                     base + 7 * th + 2 * tp};
    return s;
}

/* dst (T,hs) = head slice of src (T,C); dst_t (hs,Tp) its transpose if given. */
static void gather_head(float *dst, float *dst_t, const float *src, int T, int C, int hs) {
    int Tp = padded(T);
    for (int t = 0; t < T; t++) {
        const float *row = src + (size_t)t * C;
        memcpy(dst + (size_t)t * hs, row, sizeof(float) * hs);
        if (dst_t)
            for (int d = 0; d < hs; d++) dst_t[(size_t)d * Tp + t] = row[d];
    }
    if (dst_t)
        for (int d = 0; d < hs; d++)
            for (int t = T; t < Tp; t++) dst_t[(size_t)d * Tp + t] = 0.0f;
}

/* row[s] = scale * sum_d x[d] * xt[d][s] for s < n (xt is (hs,Tp)); blocks of
 * U vectors of s accumulate in registers while d runs. */
static void sweep_keys(float *row, const float *x, const float *xt, int n, int Tp, int hs,
                       float scale) {
    for (int s0 = 0; s0 < n; s0 += U * VLEN) {
        vfloat acc[U] = {{0}};
        for (int d = 0; d < hs; d++) {
            float xd = x[d] * scale;
            const float *col = xt + (size_t)d * Tp + s0;
            for (int u = 0; u < U; u++) acc[u] += xd * *(const vfloat *)(col + u * VLEN);
        }
        for (int u = 0; u < U; u++) *(vfloat *)(row + s0 + u * VLEN) = acc[u];
    }
}

/* out[d] = sum_{s<n} w[s] * x[s][d] for x (n,hs): a vector of d accumulates
 * in U registers, each taking every U-th s. */
static void weighted_rows(float *out, const float *w, const float *x, int n, int hs) {
    int d0 = 0;
    for (; d0 + VLEN <= hs; d0 += VLEN) {
        vfloat acc[U] = {{0}};
        int s = 0;
        for (; s + U <= n; s += U)
            for (int u = 0; u < U; u++)
                acc[u] += w[s + u] * *(const vfloat *)(x + (size_t)(s + u) * hs + d0);
        for (; s < n; s++) acc[0] += w[s] * *(const vfloat *)(x + (size_t)s * hs + d0);
        *(vfloat *)(out + d0) = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
    for (int d = d0; d < hs; d++) {  /* hs not a multiple of the vector width */
        float acc = 0.0f;
        for (int s = 0; s < n; s++) acc += w[s] * x[(size_t)s * hs + d];
        out[d] = acc;
    }
}

static inline float row_max(const float *row, int n) {
    float maxv = -INFINITY;
    #pragma omp simd reduction(max : maxv)
    for (int s = 0; s < n; s++) maxv = row[s] > maxv ? row[s] : maxv;
    return maxv;
}

void attention_forward(float *out, float *lse, const float *q, const float *k,
                       const float *v, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel
    {
        HeadScratch w = head_scratch(T, hs);
        #pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++) {
                size_t base = (size_t)b * T * C + (size_t)h * hs;
                gather_head(w.q, NULL, q + base, T, C, hs);
                gather_head(w.k, w.kt, k + base, T, C, hs);
                gather_head(w.v, NULL, v + base, T, C, hs);
                for (int t = 0; t < T; t++) {
                    int n = t + 1;
                    sweep_keys(w.row, w.q + (size_t)t * hs, w.kt, n, padded(T), hs, scale);
                    float maxv = row_max(w.row, n);
                    float sum = 0.0f;
                    #pragma omp simd reduction(+ : sum)
                    for (int s = 0; s < n; s++) {
                        w.row[s] = fast_expf(w.row[s] - maxv);
                        sum += w.row[s];
                    }
                    weighted_rows(w.acc, w.row, w.v, n, hs);
                    float inv = 1.0f / sum, *ot = out + base + (size_t)t * C;
                    for (int d = 0; d < hs; d++) ot[d] = w.acc[d] * inv;
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
        HeadScratch w = head_scratch(T, hs);
        #pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++) {
                size_t base = (size_t)b * T * C + (size_t)h * hs;
                const float *lse_bh = lse + ((size_t)b * NH + h) * T;
                gather_head(w.q, NULL, q + base, T, C, hs);
                gather_head(w.k, w.kt, k + base, T, C, hs);
                gather_head(w.v, w.vt, v + base, T, C, hs);
                memset(w.dk, 0, sizeof(float) * T * hs);
                memset(w.dv, 0, sizeof(float) * T * hs);
                for (int t = 0; t < T; t++) {
                    int n = t + 1;
                    size_t row = base + (size_t)t * C;
                    const float *qt = w.q + (size_t)t * hs, *go = dout + row;
                    /* p[s] = softmax row, recomputed; ds = p * (dp - dout.out) * scale */
                    sweep_keys(w.p, qt, w.kt, n, padded(T), hs, scale);
                    sweep_keys(w.row, go, w.vt, n, padded(T), hs, 1.0f); /* dp[s] = dout_t . v_s */
                    float l = lse_bh[t], D = 0.0f;
                    for (int d = 0; d < hs; d++) D += go[d] * out[row + d];
                    #pragma omp simd
                    for (int s = 0; s < n; s++) {
                        w.p[s] = fast_expf(w.p[s] - l);
                        w.row[s] = w.p[s] * (w.row[s] - D) * scale;
                    }
                    /* dq_t = sum_s ds[s] k_s; dk_s += ds[s] q_t; dv_s += p[s] dout_t */
                    weighted_rows(w.acc, w.row, w.k, n, hs);
                    for (int d = 0; d < hs; d++) dq[row + d] += w.acc[d];
                    for (int s = 0; s < n; s++) {
                        float *restrict dks = w.dk + (size_t)s * hs;
                        float *restrict dvs = w.dv + (size_t)s * hs;
                        float ds = w.row[s], ps = w.p[s];
                        #pragma omp simd
                        for (int d = 0; d < hs; d++) {
                            dks[d] += ds * qt[d];
                            dvs[d] += ps * go[d];
                        }
                    }
                }
                for (int t = 0; t < T; t++)
                    for (int d = 0; d < hs; d++) {
                        dk[base + (size_t)t * C + d] += w.dk[(size_t)t * hs + d];
                        dv[base + (size_t)t * C + d] += w.dv[(size_t)t * hs + d];
                    }
            }
    }
}
