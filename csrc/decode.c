/* Generation: one token through every layer with a KV cache, in one call,
 * so a token costs no Python round trips and no allocation.
 *
 * The same math as the training forward in eval mode (parameter-free
 * layernorm, causal attention, ReLU MLP, no dropout), one row at a time:
 * x (C) is the residual stream of the new token at position pos; its keys and
 * values are appended to the cache and attention reads positions 0..pos.
 *
 * A token reads every weight once, so decoding is bound by memory bandwidth:
 * both cores stream halves of each matrix, packed into contiguous panels, in
 * float32 or (on request) bfloat16, which halves the bytes. One parallel
 * region spans the whole step (a region per matvec would cost more than the
 * matvec), with a barrier wherever a result feeds the next op.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernel.h"

/* Panels are PANEL columns (NV vectors) wide. */
#define NV 4
#define PANEL (NV * VLEN)
typedef uint32_t vuint __attribute__((vector_size(VLEN * 4), aligned(4)));
_Static_assert(NV % 2 == 0, "a bf16 panel row is whole words of two vectors");

/* W (C,OC) as column panels, each a contiguous (C,PANEL) block (the last
 * zero-padded), so that a matvec streams memory in order: with row-major W
 * each panel row sits a whole W row apart and the hardware prefetcher falls
 * behind (lua decode 1.6x slower). */
long panels_size(int C, int OC) {
    return (long)C * PANEL * ((OC + PANEL - 1) / PANEL);
}

/* float32 -> bfloat16 (float32's top 16 bits), rounding to nearest even. */
static uint32_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return (u >> 16) | 0x40; /* NaN stays NaN */
    return (u + 0x7fff + ((u >> 16) & 1)) >> 16;
}

/* In bf16 panels, 32-bit word i of a row's word vector k holds column
 * 2k*VLEN + i in its low half and column (2k+1)*VLEN + i in its high half:
 * a shift and a mask then widen a whole vector of each to float32, with no
 * lane shuffles. */
void pack_panels(void *dst, const float *w, int C, int OC, int bf16) {
    float *out = dst;
    uint32_t *words = dst;
    for (int j0 = 0; j0 < OC; j0 += PANEL)
        for (int p = 0; p < C; p++) {
            const float *row = w + (size_t)p * OC;
            #define COLUMN(j) (j0 + (j) < OC ? row[j0 + (j)] : 0.0f)
            if (!bf16) {
                int n = OC - j0 < PANEL ? OC - j0 : PANEL;
                memcpy(out, row + j0, sizeof(float) * n);
                memset(out + n, 0, sizeof(float) * (PANEL - n));
                out += PANEL;
            } else /* word vector k holds vectors 2k (low halves) and 2k+1 (high) */
                for (int k = 0; k < NV / 2; k++)
                    for (int i = 0; i < VLEN; i++)
                        *words++ = to_bf16(COLUMN(2 * k * VLEN + i)) |
                                   to_bf16(COLUMN((2 * k + 1) * VLEN + i)) << 16;
            #undef COLUMN
        }
}

/* Vector i of a panel row as float32 (bf16 is float32's top half). */
static inline __attribute__((always_inline)) vfloat
panel_vector(const void *row, int i, const int bf16) {
    if (!bf16) return ((const vfloat *)row)[i];
    vuint word = ((const vuint *)row)[i / 2];
    return (vfloat)(i % 2 ? word & 0xffff0000u : word << 16);
}

/* out (PANEL) = x (C) @ panel (C,PANEL). Two accumulator sets (even and odd
 * rows) so that the FMA latency does not bound a panel that sits in cache. */
static inline __attribute__((always_inline)) void
panel_matvec(float *out, const float *x, const void *panel, int C, const int bf16) {
    size_t row_bytes = (size_t)PANEL * (bf16 ? 2 : 4);
    const char *rows = panel;
    vfloat even[NV] = {0}, odd[NV] = {0};
    int p = 0;
    for (; p + 1 < C; p += 2) {
        const char *r0 = rows + p * row_bytes, *r1 = r0 + row_bytes;
        for (int v = 0; v < NV; v++) {
            even[v] += x[p] * panel_vector(r0, v, bf16);
            odd[v] += x[p + 1] * panel_vector(r1, v, bf16);
        }
    }
    if (p < C)
        for (int v = 0; v < NV; v++) even[v] += x[p] * panel_vector(rows + p * row_bytes, v, bf16);
    for (int v = 0; v < NV; v++) *(vfloat *)(out + v * VLEN) = even[v] + odd[v];
}

/* y (OC) = x (C) @ W (C,OC) from W's panels, panels shared among the team
 * (each thread always gets the same ones, so they stay in its cache); with
 * relu, max(y, 0). No barrier. */
static void matvec(float *y, const float *x, const void *panels, int C, int OC, int bf16,
                   int relu) {
    int blocks = (OC + PANEL - 1) / PANEL;
    size_t panel_bytes = (size_t)C * PANEL * (bf16 ? 2 : 4);
    #pragma omp for schedule(static) nowait
    for (int b = 0; b < blocks; b++) {
        const void *panel = (const char *)panels + b * panel_bytes;
        int j0 = b * PANEL, n = OC - j0 < PANEL ? OC - j0 : PANEL;
        float out[PANEL] __attribute__((aligned(64)));
        if (bf16) panel_matvec(out, x, panel, C, 1);
        else panel_matvec(out, x, panel, C, 0);
        for (int j = 0; j < n; j++) y[j0 + j] = relu && !(out[j] > 0.0f) ? 0.0f : out[j];
    }
}

/* x += branch, then ln = layernorm(x). */
static void residual_norm(float *x, float *ln, const float *branch, int C, float eps) {
    float mean;
    for (int c = 0; c < C; c++) x[c] += branch[c];
    layernorm_row(ln, &mean, x, NULL, NULL, C, eps);
}

/* Keys are cached transposed per head, (num_layers, NH, hs, key_stride),
 * so that a query's scores against VLEN positions are one vector FMA per
 * head dimension, with no horizontal sums. */
static int key_stride(int max_T) {
    return (max_T + VLEN - 1) / VLEN * VLEN;
}

long key_cache_size(const DecodeModel *m) {
    return (long)m->num_layers * m->C * key_stride(m->max_T);
}

/* att (C) = causal attention of query q (C) over positions 0..pos, after
 * storing the new key krow (C) at pos in kt (NH, hs, Tk); values vc
 * (max_T, C). Heads are shared among the team; scores (Tk) are the
 * caller's. Scores past pos are computed from stale keys and never used. */
static void attend(float *att, float *scores, const float *q, const float *krow, float *kt,
                   const float *vc, int pos, int C, int NH, int Tk) {
    int hs = C / NH, n = pos + 1;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp for schedule(static)
    for (int h = 0; h < NH; h++) {
        float *kh = kt + (size_t)h * hs * Tk;
        const float *qh = q + h * hs;
        for (int d = 0; d < hs; d++) kh[(size_t)d * Tk + pos] = krow[h * hs + d];
        for (int s0 = 0; s0 < n; s0 += VLEN) {
            vfloat dots = {0};
            for (int d = 0; d < hs; d++)
                dots += qh[d] * *(const vfloat *)(kh + (size_t)d * Tk + s0);
            *(vfloat *)(scores + s0) = dots * scale;
        }
        float maxv = -INFINITY, sum = 0.0f;
        for (int s = 0; s < n; s++) maxv = scores[s] > maxv ? scores[s] : maxv;
        #pragma omp simd reduction(+ : sum)
        for (int s = 0; s < n; s++) {
            scores[s] = fast_expf(scores[s] - maxv);
            sum += scores[s];
        }
        /* att_h = sum_s p_s v_s, a vector of head dims at a time in a register */
        const float *vh = vc + h * hs;
        float *ah = att + h * hs, inv = 1.0f / sum;
        int d = 0;
        for (; d + VLEN <= hs; d += VLEN) {
            vfloat acc = {0};
            for (int s = 0; s < n; s++)
                acc += scores[s] * *(const vfloat *)(vh + (size_t)s * C + d);
            *(vfloat *)(ah + d) = acc * inv;
        }
        for (; d < hs; d++) {
            float acc = 0.0f;
            for (int s = 0; s < n; s++) acc += scores[s] * vh[(size_t)s * C + d];
            ah[d] = acc * inv;
        }
    }
}

/* Every thread keeps its own copy of the residual stream x and its
 * layernorm, computing both redundantly (C values), so no thread waits on
 * another for them: a barrier costs more than the work. Barriers remain only
 * where a matvec's output, split among threads, feeds the next op. */
void decode_step(const DecodeModel *m, float *kcache, float *vcache, int token,
                 int pos, float *logits) {
    int C = m->C, Tk = key_stride(m->max_T);
    /* shared rows: q, k, att, branch (C each), h (4C) */
    float *q = scratch(1, (size_t)8 * C), *k = q + C, *att = k + C, *branch = att + C;
    float *h = branch + C;
    /* one thread for models whose matrices fit in a core's cache anyway */
    #pragma omp parallel if ((long)C * C >= 128 * 128)
    {
        /* this thread's x, ln (C each) and attention scores (Tk) */
        float *x = scratch(4, (size_t)2 * C + Tk), *ln = x + C, *scores = ln + C;
        float mean;
        for (int c = 0; c < C; c++)
            x[c] = m->wte[(size_t)token * C + c] + m->wpe[(size_t)pos * C + c];
        layernorm_row(ln, &mean, x, NULL, NULL, C, m->ln_eps);
        for (int l = 0; l < m->num_layers; l++) {
            float *kt = kcache + (size_t)l * C * Tk;
            float *vc = vcache + (size_t)l * m->max_T * C;
            matvec(q, ln, m->q[l], C, C, m->bf16, 0);
            matvec(k, ln, m->k[l], C, C, m->bf16, 0);
            matvec(vc + (size_t)pos * C, ln, m->v[l], C, C, m->bf16, 0);
            #pragma omp barrier
            attend(att, scores, q, k, kt, vc, pos, C, m->NH, Tk);  /* ends in a barrier */
            matvec(branch, att, m->proj[l], C, C, m->bf16, 0);
            #pragma omp barrier
            residual_norm(x, ln, branch, C, m->ln_eps);
            matvec(h, ln, m->fc1[l], C, 4 * C, m->bf16, 1);
            #pragma omp barrier
            matvec(branch, h, m->fc2[l], 4 * C, C, m->bf16, 0);
            #pragma omp barrier
            residual_norm(x, ln, branch, C, m->ln_eps);  /* the last ln goes unused */
        }
        matvec(logits, x, m->head, C, m->V, m->bf16, 0);
    }
}
