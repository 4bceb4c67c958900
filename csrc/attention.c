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
    float *row, *p;     /* (QB,Tp): a block of query rows */
    float *acc;         /* (hs): one output row being summed */
} HeadScratch;

/* Sweeps keep U independent vector accumulators in flight (an FMA's result
 * is ready only a few cycles later). Transposed copies have rows of Tp >= T
 * floats, a whole number of U-vector blocks, so a sweep over keys may read
 * (and ignore) a partial block past t. */
#define U 4
static inline int padded(int T) { return (T + U * VLEN - 1) / (U * VLEN) * (U * VLEN); }

/* Backward takes queries QB at a time, so each update of a dk or dv row
 * adds QB terms per load and store instead of one. */
#define QB 4

static HeadScratch head_scratch(int T, int hs) {
    size_t th = (size_t)padded(T) * hs;
    size_t tp = QB * (size_t)padded(T);
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

/* Queries t0..t1-1 of one head: their dq rows, and their terms of every dk
 * and dv row s < t1. dq, dout, out point at the head's column offset in
 * (T,C) arrays. */
static void backward_query_block(HeadScratch *w, float *dq, const float *dout,
                                 const float *out, const float *lse, int t0, int t1, int T,
                                 int C, int hs, float scale) {
    int tp = padded(T), nq = t1 - t0;
    for (int i = 0; i < nq; i++) {
        int t = t0 + i, n = t + 1;
        const float *go = dout + (size_t)t * C, *ot = out + (size_t)t * C;
        float *p = w->p + (size_t)i * tp, *ds = w->row + (size_t)i * tp;
        /* p[s] = softmax row, recomputed; ds = p * (dp - dout.out) * scale */
        sweep_keys(p, w->q + (size_t)t * hs, w->kt, n, tp, hs, scale);
        sweep_keys(ds, go, w->vt, n, tp, hs, 1.0f); /* dp[s] = dout_t . v_s */
        float D = 0.0f;
        for (int d = 0; d < hs; d++) D += go[d] * ot[d];
        #pragma omp simd
        for (int s = 0; s < n; s++) {
            p[s] = fast_expf(p[s] - lse[t]);
            ds[s] = p[s] * (ds[s] - D) * scale;
        }
        for (int s = n; s < t1; s++) p[s] = ds[s] = 0.0f; /* causal: later keys unseen */
        weighted_rows(w->acc, ds, w->k, n, hs);          /* dq_t = sum_s ds[s] k_s */
        for (int d = 0; d < hs; d++) dq[(size_t)t * C + d] += w->acc[d];
    }
    /* dk_s += sum_i ds_i[s] q_i;  dv_s += sum_i p_i[s] dout_i. For a full
     * block the q_i and dout_i vectors stay in registers while s runs, and the
     * QB terms are summed as a tree, so rows s are independent work. */
    int d0 = 0;
    if (nq == QB)
        for (; d0 + VLEN <= hs; d0 += VLEN) {
            vfloat qv[QB], gv[QB];
            for (int i = 0; i < QB; i++) {
                qv[i] = *(const vfloat *)(w->q + (size_t)(t0 + i) * hs + d0);
                gv[i] = *(const vfloat *)(dout + (size_t)(t0 + i) * C + d0);
            }
            const float *ds = w->row, *p = w->p;
            for (int s = 0; s < t1; s++) {
                vfloat *dks = (vfloat *)(w->dk + (size_t)s * hs + d0);
                vfloat *dvs = (vfloat *)(w->dv + (size_t)s * hs + d0);
                *dks += (ds[s] * qv[0] + ds[tp + s] * qv[1]) +
                        (ds[2 * tp + s] * qv[2] + ds[3 * tp + s] * qv[3]);
                *dvs += (p[s] * gv[0] + p[tp + s] * gv[1]) +
                        (p[2 * tp + s] * gv[2] + p[3 * tp + s] * gv[3]);
            }
        }
    for (int d = d0; d < hs; d++)  /* a partial block, or hs not a multiple of VLEN */
        for (int s = 0; s < t1; s++)
            for (int i = 0; i < nq; i++) {
                w->dk[(size_t)s * hs + d] += w->row[(size_t)i * tp + s] * w->q[(size_t)(t0 + i) * hs + d];
                w->dv[(size_t)s * hs + d] += w->p[(size_t)i * tp + s] * dout[(size_t)(t0 + i) * C + d];
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
                for (int t0 = 0; t0 < T; t0 += QB)
                    backward_query_block(&w, dq + base, dout + base, out + base, lse_bh,
                                         t0, T < t0 + QB ? T : t0 + QB, T, C, hs, scale);
                for (int t = 0; t < T; t++)
                    for (int d = 0; d < hs; d++) {
                        dk[base + (size_t)t * C + d] += w.dk[(size_t)t * hs + d];
                        dv[base + (size_t)t * C + d] += w.dv[(size_t)t * hs + d];
                    }
            }
    }
}
