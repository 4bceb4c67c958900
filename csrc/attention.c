/* Causal self-attention, scaled dot product, grouped-query.
 *
 * q and out are (B,T,NH*hs), k and v (B,T,KVH*hs); query head h uses
 * columns [h*hs, (h+1)*hs) of q and kv head h / (NH/KVH) of k and v.
 * lse is (B,NH,T): the log-sum-exp of each row of scaled scores. The (T,T)
 * probability matrix is never stored: backward recomputes it block by block
 * from q, k and lse, which costs one more product but keeps memory linear in
 * T.
 *
 * Forward splits work over (b, query head) pairs, backward over (b, kv head)
 * pairs, each summing the dk and dv of its group's query heads; each copies
 * its heads' slices into contiguous per-thread scratch and writes its own
 * slices of out, dq, dk, dv, so no two threads touch the same float. Queries
 * go QB at a time, and every product of a block is a gemm call (the tuned
 * matmul) on transposed scores: S^T (keys, queries) = K Q^T. With queries
 * along the vector lanes, a 16-wide head still fills whole registers, and
 * the softmax over keys becomes elementwise work across rows.
 */
#include <math.h>
#include <string.h>
#include "kernel.h"

/* Queries per block: one gemm panel wide on AVX-512. */
#define QB 64

/* The per-(b,h) working set, all contiguous. */
typedef struct {
    float *q, *k, *v;    /* (T,hs); q pre-multiplied by the score scale */
    float *dk, *dv;      /* (T,hs) */
    float *pt, *dst;     /* (T,QB): a block's P^T and dS^T (keys, queries) */
    float *ot;           /* (hs,QB): a block's output or dq, transposed */
    float *qsum;         /* (QB): a per-query sum or D */
} HeadScratch;

/* .q is NULL when the scratch cannot grow (noted for the status). */
static HeadScratch head_scratch(int T, int hs) {
    size_t th = (size_t)T * hs, tq = (size_t)T * QB;
    float *base = scratch(SCRATCH_HEADS, 5 * th + 2 * tq + (size_t)hs * QB + QB);
    if (!base) return (HeadScratch){0};
    HeadScratch s = {base, base + th, base + 2 * th, base + 3 * th, base + 4 * th,
                     base + 5 * th, base + 5 * th + tq, base + 5 * th + 2 * tq,
                     base + 5 * th + 2 * tq + (size_t)hs * QB};
    return s;
}

/* dst (T,hs) = scale * head slice of src (T,C) (C: src's row length);
 * whole vectors when hs allows. */
static void gather_head(float *dst, const float *src, int T, int C, int hs, float scale) {
    for (int t = 0; t < T; t++) {
        const float *row = src + (size_t)t * C;
        float *out = dst + (size_t)t * hs;
        int d = 0;
        for (; d + VLEN <= hs; d += VLEN) *(vfloat *)(out + d) = scale * *(const vfloat *)(row + d);
        for (; d < hs; d++) out[d] = scale * row[d];
    }
}

/* pt (n,nq) = S^T for queries t0..t0+nq-1 over keys 0..n-1, n = t0 + nq:
 * K Q^T with the scale already in q. */
static void scores_t(HeadScratch *w, int t0, int nq, int hs) {
    Strided K = {w->k, hs, 1}, Qt = {w->q + (size_t)t0 * hs, 1, hs};
    gemm(w->pt, K, Qt, t0 + nq, nq, hs, 1);
}

/* Key s is seen by the block's queries i >= first_seen (query t0 + i sees
 * keys up to t0 + i): the columns before are masked. */
static inline int first_seen(int s, int t0) {
    return s > t0 ? s - t0 : 0;
}

/* The row-wise steps of the softmax over a block's P^T rows (nq columns).
 * A full row of a full block has the constant trip count QB, which the
 * compiler turns into independent vectors; other rows take the general loop. */
#define FOR_COLUMNS(i, seen, nq, body)                                   \
    do {                                                                 \
        if ((seen) == 0 && (nq) == QB) {                                 \
            _Pragma("omp simd") for (int i = 0; i < QB; i++) body        \
        } else {                                                         \
            _Pragma("omp simd") for (int i = (seen); i < (nq); i++) body \
        }                                                                \
    } while (0)

/* row[i] = exp(row[i] - sub[i]) for seen columns, 0 for masked ones. */
static inline void exp_row(float *row, const float *sub, int seen, int nq) {
    for (int i = 0; i < seen; i++) row[i] = 0.0f;
    FOR_COLUMNS(i, seen, nq, { row[i] = fast_expf(row[i] - sub[i]); });
}

int attention_forward(float *out, float *lse, const float *q, const float *k,
                      const float *v, int B, int T, int NH, int KVH, int hs) {
    int C = NH * hs, KVC = KVH * hs, group = NH / KVH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel
    {
        HeadScratch w = head_scratch(T, hs);
        float maxv[QB];
        #pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++) {
                if (!w.q) continue;
                size_t base = (size_t)b * T * C + (size_t)h * hs;
                size_t kv_base = (size_t)b * T * KVC + (size_t)(h / group) * hs;
                gather_head(w.q, q + base, T, C, hs, scale);
                gather_head(w.k, k + kv_base, T, KVC, hs, 1.0f);
                gather_head(w.v, v + kv_base, T, KVC, hs, 1.0f);
                for (int t0 = 0; t0 < T; t0 += QB) {
                    int nq = T - t0 < QB ? T - t0 : QB, n = t0 + nq;
                    scores_t(&w, t0, nq, hs);
                    /* softmax down each column: max, then exp and sum */
                    for (int i = 0; i < nq; i++) maxv[i] = -INFINITY, w.qsum[i] = 0.0f;
                    for (int s = 0; s < n; s++) {
                        const float *row = w.pt + (size_t)s * nq;
                        FOR_COLUMNS(i, first_seen(s, t0), nq,
                                    { maxv[i] = row[i] > maxv[i] ? row[i] : maxv[i]; });
                    }
                    for (int s = 0; s < n; s++) {
                        float *row = w.pt + (size_t)s * nq;
                        exp_row(row, maxv, first_seen(s, t0), nq);
                        FOR_COLUMNS(i, 0, nq, { w.qsum[i] += row[i]; });
                    }
                    /* out^T (hs,nq) = V^T P^T */
                    Strided Vt = {w.v, 1, hs}, Pt = {w.pt, nq, 1};
                    gemm(w.ot, Vt, Pt, hs, nq, n, 1);
                    for (int i = 0; i < nq; i++) {
                        float inv = 1.0f / w.qsum[i], *ot = out + base + (size_t)(t0 + i) * C;
                        for (int d = 0; d < hs; d++) ot[d] = w.ot[(size_t)d * nq + i] * inv;
                        lse[((size_t)b * NH + h) * T + t0 + i] = maxv[i] + logf(w.qsum[i]);
                    }
                }
            }
    }
    return take_status();
}

/* Queries t0..t0+nq-1 of one head: their dq rows, and their terms of every
 * dk and dv row s < t0 + nq. dq, dout, out point at the head's column offset
 * in (T,C) arrays; lse at the head's row. */
static void backward_query_block(HeadScratch *w, float *dq, const float *dout,
                                 const float *out, const float *lse, int t0, int nq, int C,
                                 int hs, float scale) {
    int n = t0 + nq;
    /* P^T, recomputed from the scores and each query's log-sum-exp */
    scores_t(w, t0, nq, hs);
    for (int s = 0; s < n; s++) exp_row(w->pt + (size_t)s * nq, lse + t0, first_seen(s, t0), nq);
    /* dP^T (n,nq) = V dout^T; dS^T = P^T * (dP^T - D), D_i = dout_i . out_i */
    Strided V = {w->v, hs, 1}, Gt = {dout + (size_t)t0 * C, 1, C};
    gemm(w->dst, V, Gt, n, nq, hs, 1);
    for (int i = 0; i < nq; i++) {
        const float *go = dout + (size_t)(t0 + i) * C, *ot = out + (size_t)(t0 + i) * C;
        float D = 0.0f;
        for (int d = 0; d < hs; d++) D += go[d] * ot[d];
        w->qsum[i] = D;
    }
    for (int s = 0; s < n; s++) {
        const float *p = w->pt + (size_t)s * nq;
        float *ds = w->dst + (size_t)s * nq;
        FOR_COLUMNS(i, 0, nq, { ds[i] = p[i] * (ds[i] - w->qsum[i]); });
    }
    /* dq^T (hs,nq) = K^T dS^T, times the scale */
    Strided Kt = {w->k, 1, hs}, dSt = {w->dst, nq, 1};
    gemm(w->ot, Kt, dSt, hs, nq, n, 1);
    for (int i = 0; i < nq; i++)
        for (int d = 0; d < hs; d++)
            dq[(size_t)(t0 + i) * C + d] = scale * w->ot[(size_t)d * nq + i];
    /* dk (n,hs) += dS^T Q (q carries the scale); dv (n,hs) += P^T dout */
    Strided Q = {w->q + (size_t)t0 * hs, hs, 1}, G = {dout + (size_t)t0 * C, C, 1};
    Strided Pt = {w->pt, nq, 1};
    gemm(w->dk, dSt, Q, n, hs, nq, 0);
    gemm(w->dv, Pt, G, n, hs, nq, 0);
}

int attention_backward(float *dq, float *dk, float *dv, const float *dout,
                       const float *q, const float *k, const float *v,
                       const float *out, const float *lse,
                       int B, int T, int NH, int KVH, int hs) {
    int C = NH * hs, KVC = KVH * hs, group = NH / KVH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel
    {
        HeadScratch w = head_scratch(T, hs);
        #pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int g = 0; g < KVH; g++) {
                if (!w.q) continue;
                size_t kv_base = (size_t)b * T * KVC + (size_t)g * hs;
                gather_head(w.k, k + kv_base, T, KVC, hs, 1.0f);
                gather_head(w.v, v + kv_base, T, KVC, hs, 1.0f);
                memset(w.dk, 0, sizeof(float) * T * hs);
                memset(w.dv, 0, sizeof(float) * T * hs);
                for (int h = g * group; h < (g + 1) * group; h++) {
                    size_t base = (size_t)b * T * C + (size_t)h * hs;
                    const float *lse_bh = lse + ((size_t)b * NH + h) * T;
                    gather_head(w.q, q + base, T, C, hs, scale);
                    for (int t0 = 0; t0 < T; t0 += QB)
                        backward_query_block(&w, dq + base, dout + base, out + base, lse_bh, t0,
                                             T - t0 < QB ? T - t0 : QB, C, hs, scale);
                }
                for (int t = 0; t < T; t++)
                    for (int d = 0; d < hs; d++) {
                        dk[kv_base + (size_t)t * KVC + d] = w.dk[(size_t)t * hs + d];
                        dv[kv_base + (size_t)t * KVC + d] = w.dv[(size_t)t * hs + d];
                    }
            }
    }
    return take_status();
}
