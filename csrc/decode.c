/* Generation: one token through every layer with a KV cache, in one call,
 * so a token costs no Python round trips and no allocation.
 *
 * The same blocks as the training forward (model.c) in eval mode, for the
 * same ModelConfig, one row at a time with the same per-row helpers (norms,
 * rotary angles, activations): x (C) is the residual stream of the new token
 * at position pos; its keys (rotated once, for rope) and values are appended
 * to the cache and attention reads positions 0..pos. Grouped-query models
 * cache only their KVH key/value heads.
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

/* What a matvec does to each output before storing it. */
enum { ACT_NONE, ACT_RELU, ACT_GELU };

static inline float activate(float y, int act) {
    if (act == ACT_RELU) return y > 0.0f ? y : 0.0f; /* NaN -> 0, as training's relu */
    return act == ACT_GELU ? gelu(y) : y;
}

/* Panel block b of W (C,OC) times x, into out (PANEL). */
static void panel_block(float *out, const float *x, const void *panels, int b, int C, int bf16) {
    size_t panel_bytes = (size_t)C * PANEL * (bf16 ? 2 : 4);
    const void *panel = (const char *)panels + b * panel_bytes;
    if (bf16) panel_matvec(out, x, panel, C, 1);
    else panel_matvec(out, x, panel, C, 0);
}

/* y (OC) = act(x (C) @ W (C,OC) + bias) from W's panels, panels shared
 * among the team (each thread always gets the same ones, so they stay in
 * its cache); bias may be NULL. No barrier. */
static void matvec(float *y, const float *x, const void *panels, const float *bias, int C,
                   int OC, int bf16, int act) {
    int blocks = (OC + PANEL - 1) / PANEL;
    #pragma omp for schedule(static) nowait
    for (int b = 0; b < blocks; b++) {
        int j0 = b * PANEL, n = OC - j0 < PANEL ? OC - j0 : PANEL;
        float out[PANEL] __attribute__((aligned(64)));
        panel_block(out, x, panels, b, C, bf16);
        for (int j = 0; j < n; j++)
            y[j0 + j] = activate(out[j] + (bias ? bias[j0 + j] : 0.0f), act);
    }
}

/* SwiGLU's hidden row, h (F) = silu(x @ gate + gate_b) * (x @ up + up_b),
 * both matrices' panels of a block by the same thread, so no barrier. */
static void matvec_swiglu(float *h, const float *x, const void *gate, const float *gate_b,
                          const void *up, const float *up_b, int C, int F, int bf16) {
    int blocks = (F + PANEL - 1) / PANEL;
    #pragma omp for schedule(static) nowait
    for (int b = 0; b < blocks; b++) {
        int j0 = b * PANEL, n = F - j0 < PANEL ? F - j0 : PANEL;
        float g[PANEL] __attribute__((aligned(64))), u[PANEL] __attribute__((aligned(64)));
        panel_block(g, x, gate, b, C, bf16);
        panel_block(u, x, up, b, C, bf16);
        for (int j = 0; j < n; j++)
            h[j0 + j] = silu(g[j] + (gate_b ? gate_b[j0 + j] : 0.0f)) *
                        (u[j] + (up_b ? up_b[j0 + j] : 0.0f));
    }
}

/* y = norm(x) with the config's norm and the given gain and bias. */
static void norm_row(const ModelConfig *cfg, float *y, const float *x, const float *weight,
                     const float *bias) {
    float mean;
    if (cfg->norm == NORM_RMSNORM) rmsnorm_row(y, x, weight, cfg->C, cfg->norm_eps);
    else layernorm_row(y, &mean, x, weight, bias, cfg->C, cfg->norm_eps);
}

/* Keys are cached transposed per kv head, (num_layers, KVH, hs, key_stride),
 * so that a query's scores against VLEN positions are one vector FMA per
 * head dimension, with no horizontal sums. */
static int key_stride(int max_T) {
    return (max_T + VLEN - 1) / VLEN * VLEN;
}

long key_cache_size(const ModelConfig *cfg) {
    return (long)cfg->num_layers * cfg->KVH * (cfg->C / cfg->NH) * key_stride(cfg->max_T);
}

/* One layer's view of the step: the config and this token's place. */
typedef struct {
    const ModelConfig *cfg;
    int pos, hs, Tk;
    const float *cos, *sin;  /* this position's rotary angles (rope) */
} Step;

/* Store the new key krow (KVH*hs, rotated here for rope) at pos in kt
 * (KVH, hs, Tk), kv heads shared among the team; ends in a barrier. */
static void store_key(const Step *s, float *krow, float *kt) {
    #pragma omp for schedule(static)
    for (int g = 0; g < s->cfg->KVH; g++) {
        float *kg = krow + g * s->hs, *kh = kt + (size_t)g * s->hs * s->Tk;
        if (s->cfg->pos == POS_ROPE) rope_row(kg, s->cos, s->sin, 1, s->hs, 1.0f);
        for (int d = 0; d < s->hs; d++) kh[(size_t)d * s->Tk + s->pos] = kg[d];
    }
}

/* att (C) = causal attention of query q (C, rotated here for rope) over
 * positions 0..pos of kt and vc (max_T, KVH*hs). Query heads are shared
 * among the team; scores (Tk) are the caller's. Scores past pos are
 * computed from stale keys and never used. Ends in a barrier. */
static void attend(const Step *s, float *att, float *scores, float *q, const float *kt,
                   const float *vc) {
    int hs = s->hs, n = s->pos + 1, Tk = s->Tk, NH = s->cfg->NH, group = NH / s->cfg->KVH;
    int KVC = s->cfg->KVH * hs;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp for schedule(static)
    for (int h = 0; h < NH; h++) {
        const float *kh = kt + (size_t)(h / group) * hs * Tk;
        float *qh = q + h * hs;
        if (s->cfg->pos == POS_ROPE) rope_row(qh, s->cos, s->sin, 1, hs, 1.0f);
        for (int s0 = 0; s0 < n; s0 += VLEN) {
            vfloat dots = {0};
            for (int d = 0; d < hs; d++)
                dots += qh[d] * *(const vfloat *)(kh + (size_t)d * Tk + s0);
            *(vfloat *)(scores + s0) = dots * scale;
        }
        float maxv = -INFINITY, sum = 0.0f;
        for (int t = 0; t < n; t++) maxv = scores[t] > maxv ? scores[t] : maxv;
        #pragma omp simd reduction(+ : sum)
        for (int t = 0; t < n; t++) {
            scores[t] = fast_expf(scores[t] - maxv);
            sum += scores[t];
        }
        /* att_h = sum_t p_t v_t, a vector of head dims at a time in a register */
        const float *vh = vc + (h / group) * hs;
        float *ah = att + h * hs, inv = 1.0f / sum;
        int d = 0;
        for (; d + VLEN <= hs; d += VLEN) {
            vfloat acc = {0};
            for (int t = 0; t < n; t++)
                acc += scores[t] * *(const vfloat *)(vh + (size_t)t * KVC + d);
            *(vfloat *)(ah + d) = acc * inv;
        }
        for (; d < hs; d++) {
            float acc = 0.0f;
            for (int t = 0; t < n; t++) acc += scores[t] * vh[(size_t)t * KVC + d];
            ah[d] = acc * inv;
        }
    }
}

/* Rows shared by the team: q, att, branch (C), k (KVC), h, gate (F). */
typedef struct { float *q, *k, *att, *branch, *h; } SharedRows;

/* The next norm's input gain and bias: the next block's norm1, or after the
 * last block the final norm (a parameter-free one reads NULL). */
static void next_norm(const ModelConfig *cfg, const ModelTensors *w, int l, const float **weight,
                      const float **bias) {
    int last = l + 1 == cfg->num_layers;
    *weight = last ? w->lnf_w : w->layers[l + 1].ln1_w;
    *bias = last ? w->lnf_b : w->layers[l + 1].ln1_b;
}

/* One block for this thread: x and ln (its private copies) advance, the
 * cache gains this token's key and value; ln ends as the next norm's output. */
static void decode_block(const Step *s, const ModelTensors *w, int l, int bf16, SharedRows r,
                         float *x, float *ln, float *scores, float *kcache, float *vcache) {
    const ModelConfig *cfg = s->cfg;
    const LayerTensors *L = &w->layers[l];
    int C = cfg->C, KVC = cfg->KVH * s->hs, F = cfg->F;
    float *kt = kcache + (size_t)l * KVC * s->Tk, *vc = vcache + (size_t)l * cfg->max_T * KVC;
    matvec(r.q, ln, L->q, L->q_b, C, C, bf16, ACT_NONE);
    matvec(r.k, ln, L->k, L->k_b, C, KVC, bf16, ACT_NONE);
    matvec(vc + (size_t)s->pos * KVC, ln, L->v, L->v_b, C, KVC, bf16, ACT_NONE);
    #pragma omp barrier
    store_key(s, r.k, kt);
    attend(s, r.att, scores, r.q, kt, vc);
    matvec(r.branch, r.att, L->proj, L->proj_b, C, C, bf16, ACT_NONE);
    #pragma omp barrier
    for (int c = 0; c < C; c++) x[c] += r.branch[c];
    norm_row(cfg, ln, x, L->ln2_w, L->ln2_b);
    if (cfg->mlp == MLP_SWIGLU)
        matvec_swiglu(r.h, ln, L->gate, L->gate_b, L->fc1, L->fc1_b, C, F, bf16);
    else
        matvec(r.h, ln, L->fc1, L->fc1_b, C, F, bf16, cfg->mlp == MLP_RELU ? ACT_RELU : ACT_GELU);
    #pragma omp barrier
    matvec(r.branch, r.h, L->fc2, L->fc2_b, F, C, bf16, ACT_NONE);
    #pragma omp barrier
    for (int c = 0; c < C; c++) x[c] += r.branch[c];
    const float *weight, *bias;
    next_norm(cfg, w, l, &weight, &bias);
    norm_row(cfg, ln, x, weight, bias);  /* unused after the last block without a final norm */
}

/* Every thread keeps its own copy of the residual stream x and its norm,
 * computing both redundantly (C values), so no thread waits on another for
 * them: a barrier costs more than the work. Barriers remain only where a
 * matvec's output, split among threads, feeds the next op. */
int decode_step(const ModelConfig *cfg, const ModelTensors *w, int bf16, float *kcache,
                float *vcache, int token, int pos, float *logits) {
    int C = cfg->C, hs = C / cfg->NH, F = cfg->F, Tk = key_stride(cfg->max_T);
    float *shared = scratch(1, (size_t)3 * C + (size_t)cfg->KVH * hs + F);
    if (!shared) return take_status();
    SharedRows r = {shared, shared + C, shared + C + cfg->KVH * hs, NULL, NULL};
    r.branch = r.att + C;
    r.h = r.branch + C;
    int failed = 0;
    /* one thread for models whose matrices fit in a core's cache anyway */
    #pragma omp parallel if ((long)C * C >= 128 * 128)
    {
        /* this thread's x, ln (C each), scores (Tk) and rotary angles (hs) */
        float *x = scratch(4, (size_t)2 * C + Tk + hs);
        if (!x) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        #pragma omp barrier
        if (!__atomic_load_n(&failed, __ATOMIC_RELAXED)) {
            float *ln = x + C, *scores = ln + C, *cos_t = scores + Tk, *sin_t = cos_t + hs / 2;
            Step s = {cfg, pos, hs, Tk, cos_t, sin_t};
            if (cfg->pos == POS_ROPE) rope_angles(cos_t, sin_t, pos, hs, cfg->rope_theta);
            const float *te = w->wte + (size_t)token * C;
            const float *pe = w->wpe ? w->wpe + (size_t)pos * C : NULL;
            for (int c = 0; c < C; c++) x[c] = te[c] + (pe ? pe[c] : 0.0f);
            norm_row(cfg, ln, x, w->layers[0].ln1_w, w->layers[0].ln1_b);
            for (int l = 0; l < cfg->num_layers; l++)
                decode_block(&s, w, l, bf16, r, x, ln, scores, kcache, vcache);
            matvec(logits, cfg->final_norm ? ln : x, w->head, NULL, C, cfg->V, bf16, ACT_NONE);
        }
    }
    return take_status();
}
