/* Generation: tokens through every layer with a KV cache, in one call, so a
 * step costs no Python round trips and no allocation.
 *
 * The same blocks as the training forward (model.c) in eval mode, for the
 * same ModelConfig, with the same per-row helpers (norms, rotary angles,
 * activations). A step takes n rows: row r is a token at its position in
 * its sequence's cache slot, x (n, C) their residual streams; each row's
 * key (rotated once, for rope) and value are stored in its slot, then
 * attention reads positions 0..pos of that slot. The rows may be several
 * sequences (a batch), or consecutive positions of one (a prompt, or a
 * draft model's proposals to verify). Grouped-query models cache only their
 * KVH key/value heads.
 *
 * A step reads every weight once, so one sequence is bound by memory
 * bandwidth: both cores stream halves of each matrix, packed into
 * contiguous panels, in float32 or (on request) bfloat16, which halves the
 * bytes; more rows share each panel while it is in cache. One parallel
 * region spans the whole step (a region per matvec would cost more than the
 * matvec), with a barrier wherever a result feeds the next op.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernel.h"
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

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

/* A panel's element: float32, or half of it (HALF_*: the decode.c side of
 * the PRECISION_BF16 and PRECISION_F16 panels). */
enum { HALF_NONE, HALF_BF16, HALF_F16 };

int panel_half(int precision) {
    return precision == PRECISION_BF16 ? HALF_BF16 : precision == PRECISION_F16 ? HALF_F16
                                                                                : HALF_NONE;
}

static size_t element_bytes(int half) {
    return half ? 2 : 4;
}

/* In bf16 panels, 32-bit word i of a row's word vector k holds column
 * 2k*VLEN + i in its low half and column (2k+1)*VLEN + i in its high half:
 * a shift and a mask then widen a whole vector of each to float32, with no
 * lane shuffles. f16 panels hold a row's columns in order (the CPU widens a
 * vector of them in one instruction). */
/* W's element (p, j) is w[p * row_stride + j * column_stride]: W itself
 * (OC, 1), or W^T's storage read as W (1, C); float32, or IEEE half where
 * from_half (an F16 import's tensor, packed without a float32 copy). */
static void pack(void *dst, const void *w, int from_half, int C, int OC, int half,
                 size_t row_stride, size_t column_stride) {
    const float *w32 = w;
    const _Float16 *w16 = w;
    size_t bytes = element_bytes(half), source_bytes = from_half ? 2 : 4;
    char *at = dst; /* the next panel row */
    for (int j0 = 0; j0 < OC; j0 += PANEL)
        for (int p = 0; p < C; p++, at += PANEL * bytes) {
            size_t row = (size_t)p * row_stride;
            int n = OC - j0 < PANEL ? OC - j0 : PANEL;
            #define AT(j) (row + (size_t)(j0 + (j)) * column_stride)
            #define COLUMN(j) (j0 + (j) >= OC ? 0.0f : from_half ? (float)w16[AT(j)] : w32[AT(j)])
            if (column_stride == 1 && half != HALF_BF16 && bytes == source_bytes) {
                memcpy(at, (const char *)w + AT(0) * bytes, bytes * n); /* the same type */
                memset(at + bytes * n, 0, bytes * (PANEL - n));
            } else if (half == HALF_NONE) {
                for (int j = 0; j < PANEL; j++) ((float *)at)[j] = COLUMN(j);
            } else if (half == HALF_F16) { /* rounded to nearest even, as numpy's float16 */
                for (int j = 0; j < PANEL; j++) ((_Float16 *)at)[j] = (_Float16)COLUMN(j);
            } else { /* word vector k holds vectors 2k (low halves) and 2k+1 (high) */
                uint32_t *words = (uint32_t *)at;
                for (int k = 0; k < NV / 2; k++)
                    for (int i = 0; i < VLEN; i++)
                        *words++ = to_bf16(COLUMN(2 * k * VLEN + i)) |
                                   to_bf16(COLUMN((2 * k + 1) * VLEN + i)) << 16;
            }
            #undef COLUMN
            #undef AT
        }
}

void pack_panels(void *dst, const float *w, int C, int OC, int half) {
    pack(dst, w, 0, C, OC, half, (size_t)OC, 1);
}

void pack_panels_t(void *dst, const float *wt, int C, int OC, int half) {
    pack(dst, wt, 0, C, OC, half, 1, (size_t)C);
}

void pack_panels_f16(void *dst, const void *w, int C, int OC, int half, int transposed) {
    if (transposed) pack(dst, w, 1, C, OC, half, 1, (size_t)C);
    else pack(dst, w, 1, C, OC, half, (size_t)OC, 1);
}

/* A panel to fetch into cache meanwhile: `lines` cache lines from `at`. */
typedef struct { const char *at; int lines; } Ahead;

/* The lines of `ahead` a pass of C panel rows issues, spread evenly over the
 * pass (a burst of prefetches queues up behind the memory bus, then leaves
 * it idle while the pass computes). */
typedef struct { const char *at; int count, spread; } Spread;

static inline __attribute__((always_inline)) void fetch_spread(Spread *s, int C) {
    s->spread += s->count;
    if (s->spread >= C) {
        s->spread -= C;
        __builtin_prefetch(s->at, 0, 2);
        s->at += 64;
    }
}

/* VLEN halves widened to float32: one instruction where the CPU has one
 * (GCC 12 widens a vector of _Float16 element by element). */
static inline __attribute__((always_inline)) vfloat widen_f16(const _Float16 *h) {
#if VLEN == 16
    return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
#elif VLEN == 8 && defined(__F16C__)
    return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
#else
    vfloat v;
    for (int i = 0; i < VLEN; i++) v[i] = (float)h[i];
    return v;
#endif
}

/* Vector i of a panel row as float32 (bf16 is float32's top half). */
static inline __attribute__((always_inline)) vfloat
panel_vector(const void *row, int i, const int half) {
    if (half == HALF_NONE) return ((const vfloat *)row)[i];
    if (half == HALF_F16) return widen_f16((const _Float16 *)row + i * VLEN);
    vuint word = ((const vuint *)row)[i / 2];
    return (vfloat)(i % 2 ? word & 0xffff0000u : word << 16);
}

/* out (PANEL) = x (C) @ panel (C,PANEL), one accumulator per vector, each
 * column summed over p in order: the order every kernel here keeps, so that
 * a row's result does not depend on which rows share its step. */
static inline __attribute__((always_inline)) void
panel_matvec(float *out, const float *x, const void *panel, int C, Spread ahead, const int half) {
    size_t row_bytes = (size_t)PANEL * element_bytes(half);
    const char *rows = panel;
    vfloat acc[NV] = {0};
    for (int p = 0; p < C; p++) {
        fetch_spread(&ahead, C);
        for (int v = 0; v < NV; v++) acc[v] += x[p] * panel_vector(rows + p * row_bytes, v, half);
    }
    for (int v = 0; v < NV; v++) *(vfloat *)(out + v * VLEN) = acc[v];
}

/* Vectors half, half + 1 of R rows' outputs, out + r * PANEL for rows x +
 * r * C (r < R): each panel vector loaded once for R rows, 2R accumulators
 * (TILE_ROWS: all that the registers hold beside the panel's two vectors),
 * and the half panel stays in cache for the next R rows. */
#if VLEN == 8
#define TILE_ROWS 6 /* AVX2's 16 registers: 12 accumulators */
#else
#define TILE_ROWS 4
#endif

static inline __attribute__((always_inline)) void
panel_matvec_rows(float *out, const float *x, const void *panel, int C, int half, Spread ahead,
                  const int R, const int half_format) {
    size_t row_bytes = (size_t)PANEL * element_bytes(half_format);
    const char *rows = panel;
    vfloat acc[TILE_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = (vfloat){0};
    for (int p = 0; p < C; p++) {
        const char *row = rows + p * row_bytes;
        if (half == 0) __builtin_prefetch(row + row_bytes / 2); /* the other half, next */
        fetch_spread(&ahead, C);
        vfloat a = panel_vector(row, half, half_format), b = panel_vector(row, half + 1,
                                                                          half_format);
        for (int r = 0; r < R; r++) {
            acc[r][0] += x[(size_t)r * C + p] * a;
            acc[r][1] += x[(size_t)r * C + p] * b;
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 2; v++)
            *(vfloat *)(out + (size_t)r * PANEL + (half + v) * VLEN) = acc[r][v];
}

/* What a matvec does to each output before storing it. */
enum { ACT_NONE, ACT_RELU, ACT_GELU };

static inline float activate(float y, int act) {
    if (act == ACT_RELU) return y > 0.0f ? y : 0.0f; /* NaN -> 0, as training's relu */
    return act == ACT_GELU ? gelu(y) : y;
}

/* y (m) = x + bias, where there is a bias (else x itself). A loop that
 * tests bias per element vectorizes into masked loads, and on AVX2 AMD
 * cores a masked load from a NULL bias's page takes a microcode assist per
 * vector: over half a prompt's time outside the matmuls. */
static const float *with_bias(float *y, const float *x, const float *bias, int m) {
    if (!bias) return x;
    #pragma omp simd
    for (int j = 0; j < m; j++) y[j] = x[j] + bias[j];
    return y;
}

/* y (m) = act(x + bias) (bias may be NULL), one loop per activation so that
 * each vectorizes (GELU's exp is most of a batched step's scalar work). */
static void epilogue(float *y, const float *x, const float *bias, int m, int act) {
    x = with_bias(y, x, bias, m);
    if (act == ACT_GELU) {
        #pragma omp simd
        for (int j = 0; j < m; j++) y[j] = gelu(x[j]);
    } else {
        #pragma omp simd
        for (int j = 0; j < m; j++) y[j] = activate(x[j], act);
    }
}

/* Pass `pass` of `passes` over a panel of C rows: its share of next's lines
 * (a line per panel row at most). */
static Spread pass_share(Ahead next, int pass, int passes, int C) {
    int share = (next.lines + passes - 1) / passes;
    share = share < C ? share : C;
    int first = pass * share;
    if (first >= next.lines) return (Spread){NULL, 0, 0};
    return (Spread){next.at + (size_t)first * 64,
                    next.lines - first < share ? next.lines - first : share, 0};
}

/* A panel (C, PANEL) of W times the n rows of x (row stride C), into out
 * (n, PANEL): the panel comes from memory once, and stays in cache for the
 * rows after the first four. Meanwhile every pass over it fetches a share
 * of the next panel's lines, so that memory and arithmetic overlap. */
/* (one instance of the inlined kernels per element type: the type is a
 * constant inside each) */
#define EACH_HALF(half, call)                            \
    do {                                                 \
        if ((half) == HALF_BF16) call(HALF_BF16);        \
        else if ((half) == HALF_F16) call(HALF_F16);     \
        else call(HALF_NONE);                            \
    } while (0)

static void panel_block(float *out, const float *x, int n, const void *panel, int C, int half,
                        Ahead next) {
    int tiles = n / TILE_ROWS, passes = 2 * tiles + n % TILE_ROWS, pass = 0;
    for (int v = 0; v < NV; v += 2)
        for (int i = 0; i < tiles; i++, pass++) {
            float *o = out + (size_t)TILE_ROWS * i * PANEL;
            const float *xr = x + (size_t)TILE_ROWS * i * C;
            Spread ahead = pass_share(next, pass, passes, C);
            #define TILE(h) panel_matvec_rows(o, xr, panel, C, v, ahead, TILE_ROWS, h)
            EACH_HALF(half, TILE);
            #undef TILE
        }
    for (int r = TILE_ROWS * tiles; r < n; r++, pass++) {
        Spread ahead = pass_share(next, pass, passes, C);
        #define ROW(h) panel_matvec(out + (size_t)r * PANEL, x + (size_t)r * C, panel, C, ahead, h)
        EACH_HALF(half, ROW);
        #undef ROW
    }
}

/* How a step's matrices are stored: column panels in float32 or half of
 * it (HALF_*), or rows of int8 / int4 groups of `group` (quant.c; bits 0
 * for panels). */
typedef struct { int half, bits, group; } Format;

/* A matmat's input rows as the format reads them: float32, and for integer
 * weights also quantized (int8 groups, this thread's copy). */
typedef struct { const float *x; int8_t *q; float *scales; } Rows;

/* x (n, C) as a matmat reads it: for integer weights, quantized into this
 * thread's buffers (each thread its own copy, so no barrier). */
static Rows rows_for(const Format *f, const float *x, int n, int C, int8_t *q, float *scales) {
    Rows rows = {x, q, scales};
    if (f->bits)
        for (int r = 0; r < n; r++)
            quantize_q8(q + 2 * (size_t)r * C, scales + (size_t)r * (C / f->group),
                        x + (size_t)r * C, C, f->group);
    return rows;
}

static size_t panel_bytes(int C, int half) {
    return (size_t)C * PANEL * element_bytes(half);
}

/* This thread's share of n outputs, [*j0, *j1): the same every call. */
static void own_share(int n, int *j0, int *j1) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *j0 = (int)((long)n * t / nt);
    *j1 = (int)((long)n * (t + 1) / nt);
}

/* This thread's blocks of PANEL columns of OC, [*b0, *b1). */
static void own_blocks(int OC, int *b0, int *b1) {
    own_share((OC + PANEL - 1) / PANEL, b0, b1);
}

/* This thread's share of an integer W's OC outputs: whole blocks of the
 * kernel's arranged outputs (quant_lanes), so that none is cut. */
static void own_outputs(int OC, int *j0, int *j1) {
    int unit = quant_lanes() ? quant_lanes() : 1;
    own_share((OC + unit - 1) / unit, j0, j1);
    *j0 = *j0 * unit < OC ? *j0 * unit : OC;
    *j1 = *j1 * unit < OC ? *j1 * unit : OC;
}

/* This thread's first panel of W (C,OC) (none for integer weights). */
static Ahead first_panel(const Format *f, const void *w, int C, int OC) {
    int b0, b1;
    own_blocks(OC, &b0, &b1);
    if (f->bits || !w || b0 >= b1) return (Ahead){NULL, 0};
    return (Ahead){(const char *)w + b0 * panel_bytes(C, f->half),
                   (int)(panel_bytes(C, f->half) / 64)};
}

/* Outputs j0..j1-1 of the integer W (C,OC) for the n rows of x, into y's
 * rows ldy apart. */
static void quant_rows(float *y, int ldy, const Format *f, const void *w, Rows x, int n, int j0,
                       int j1, int C, int OC) {
    quant_tile(y, ldy, n, j0, j1, w, x.q, x.scales, C, OC, f->bits, f->group);
}

/* y (n, OC) = act(x (n, C) @ W (C,OC) + bias), outputs shared among the team
 * (each thread always gets the same ones, so they stay in its cache): from
 * W's panels, a block of PANEL columns at a time (out is this thread's (n,
 * PANEL) scratch), or from its integer rows; bias may be NULL. No barrier.
 * During its last panel, a thread fetches `then`, its first panel of the
 * next matmat. */
static void matmat(float *y, Rows x, int n, const void *w, const float *bias, int C, int OC,
                   const Format *f, int act, float *out, Ahead then) {
    if (f->bits) {
        int j0, j1;
        own_outputs(OC, &j0, &j1);
        quant_rows(y + j0, OC, f, w, x, n, j0, j1, C, OC);
        for (int r = 0; r < n; r++) {
            float *out_r = y + (size_t)r * OC + j0;
            epilogue(out_r, out_r, bias ? bias + j0 : NULL, j1 - j0, act);
        }
        return;
    }
    int b0, b1, lines = (int)(panel_bytes(C, f->half) / 64);
    own_blocks(OC, &b0, &b1);
    for (int b = b0; b < b1; b++) {
        int j0 = b * PANEL, m = OC - j0 < PANEL ? OC - j0 : PANEL;
        const char *panel = (const char *)w + b * panel_bytes(C, f->half);
        Ahead next = b + 1 < b1 ? (Ahead){panel + panel_bytes(C, f->half), lines} : then;
        panel_block(out, x.x, n, panel, C, f->half, next);
        for (int r = 0; r < n; r++)
            epilogue(y + (size_t)r * OC + j0, out + (size_t)r * PANEL, bias ? bias + j0 : NULL, m,
                     act);
    }
}

/* h (m) = silu(g + gate_b) * (u + up_b) (biases may be NULL; g and u take
 * them in place), vectorized (a scalar loop was a third of a batched llama
 * step's work outside the matmuls). */
static void swiglu(float *h, float *g, float *u, const float *gate_b, const float *up_b, int m) {
    const float *gate = with_bias(g, g, gate_b, m), *up = with_bias(u, u, up_b, m);
    #pragma omp simd
    for (int j = 0; j < m; j++) h[j] = silu(gate[j]) * up[j];
}

/* SwiGLU's hidden rows, h (n, F) = silu(x @ gate + gate_b) * (x @ up + up_b),
 * both matrices' outputs j by the same thread, so no barrier; out is this
 * thread's (2n, PANEL) scratch. */
static void matmat_swiglu(float *h, Rows x, int n, const void *gate, const float *gate_b,
                          const void *up, const float *up_b, int C, int F, const Format *f,
                          float *out, Ahead then) {
    if (f->bits) { /* the gate's outputs in h, the up ones a PANEL at a time in out */
        int j0, j1;
        own_outputs(F, &j0, &j1);
        for (int b = j0; b < j1; b += PANEL) {
            int e = b + PANEL < j1 ? b + PANEL : j1;
            quant_rows(h + b, F, f, gate, x, n, b, e, C, F);
            quant_rows(out, PANEL, f, up, x, n, b, e, C, F);
            for (int r = 0; r < n; r++)
                swiglu(h + (size_t)r * F + b, h + (size_t)r * F + b, out + (size_t)r * PANEL,
                       gate_b ? gate_b + b : NULL, up_b ? up_b + b : NULL, e - b);
        }
        return;
    }
    int b0, b1, lines = (int)(panel_bytes(C, f->half) / 64);
    float *g = out, *u = out + (size_t)n * PANEL;
    own_blocks(F, &b0, &b1);
    for (int b = b0; b < b1; b++) { /* the gate's panel, then the up one's, then the next gate's */
        int j0 = b * PANEL, m = F - j0 < PANEL ? F - j0 : PANEL;
        size_t at = b * panel_bytes(C, f->half);
        const char *gate_panel = (const char *)gate + at, *up_panel = (const char *)up + at;
        panel_block(g, x.x, n, gate_panel, C, f->half, (Ahead){up_panel, lines});
        panel_block(u, x.x, n, up_panel, C, f->half,
                    b + 1 < b1 ? (Ahead){gate_panel + panel_bytes(C, f->half), lines} : then);
        for (int r = 0; r < n; r++)
            swiglu(h + (size_t)r * F + j0, g + (size_t)r * PANEL, u + (size_t)r * PANEL,
                   gate_b ? gate_b + j0 : NULL, up_b ? up_b + j0 : NULL, m);
    }
}

/* y = norm(x) with the config's norm and the given gain and bias. */
static void norm_row(const ModelConfig *cfg, float *y, const float *x, const float *weight,
                     const float *bias) {
    float mean;
    if (cfg->norm == NORM_RMSNORM) rmsnorm_row(y, x, weight, cfg->C, cfg->norm_eps);
    else layernorm_row(y, &mean, x, weight, bias, cfg->C, cfg->norm_eps);
}

/* Keys are cached per kv head in blocks of VLEN positions, each block
 * (hs, VLEN): a query's scores against VLEN positions are one vector FMA per
 * head dimension, with no horizontal sums, and a head's keys up to pos are
 * one contiguous run of memory (a layout transposed over all Tk positions
 * puts each head dimension a whole row apart, and the prefetcher loses
 * them). Layer l's keys: (KVH, Tk / VLEN, hs, VLEN). */
static int key_stride(int max_T) {
    return (max_T + VLEN - 1) / VLEN * VLEN;
}

long key_cache_size(const ModelConfig *cfg) {
    return (long)cfg->num_layers * cfg->KVH * cfg->HS * key_stride(cfg->max_T);
}

/* One batched step as a layer sees it: n rows, row r the token at position
 * pos[r] of the sequence whose caches are slot slots[r]. */
typedef struct {
    const ModelConfig *cfg;
    int n, hs, Tk;
    const int *pos, *slots;
    const float *angles;      /* row r's rotary angles (rope): cos (hs/2), then sin (hs/2) */
    float *kcache, *vcache;   /* every slot's caches */
} Step;

/* Row r's key cache (KVH, Tk / VLEN, hs, VLEN) and value cache (KVH, max_T,
 * hs) of layer l: a head's keys and values are each one run of memory,
 * which the hardware prefetcher streams (a batch's attention reads its
 * caches from memory: the weights stream through the caches in between). */
static float *keys_of(const Step *s, int r, int l) {
    const ModelConfig *cfg = s->cfg;
    size_t layer = (size_t)cfg->KVH * s->hs * s->Tk;
    return s->kcache + (size_t)s->slots[r] * cfg->num_layers * layer + l * layer;
}

static float *values_of(const Step *s, int r, int l) {
    const ModelConfig *cfg = s->cfg;
    size_t layer = (size_t)cfg->max_T * cfg->KVH * s->hs;
    return s->vcache + (size_t)s->slots[r] * cfg->num_layers * layer + l * layer;
}

/* Store each row's new key k (n, KVH*hs, rotated here for rope) and value v
 * at its position in its caches, (row, kv head) pairs shared among the
 * team; ends in a barrier, so every row's attention sees the keys of the
 * rows before it (a sequence's consecutive positions in one step). */
static void store_kv(const Step *s, int l, float *k, const float *v) {
    int KVH = s->cfg->KVH, hs = s->hs, KVC = KVH * hs;
    #pragma omp for schedule(static)
    for (int rg = 0; rg < s->n * KVH; rg++) {
        int r = rg / KVH, g = rg % KVH, pos = s->pos[r];
        float *kg = k + (size_t)r * KVC + g * hs;
        float *kh = keys_of(s, r, l) + (size_t)g * hs * s->Tk;
        const float *cos = s->angles + (size_t)r * hs;
        if (s->cfg->pos == POS_ROPE) rope_row(kg, cos, cos + hs / 2, 1, hs, 1.0f);
        float *block = kh + (size_t)(pos / VLEN) * hs * VLEN + pos % VLEN;
        for (int d = 0; d < hs; d++) block[(size_t)d * VLEN] = kg[d];
        memcpy(values_of(s, r, l) + ((size_t)g * s->cfg->max_T + pos) * hs,
               v + (size_t)r * KVC + g * hs, sizeof(float) * hs);
    }
}

/* scores (n, rounded up to VLEN) = q (hs) . each cached key, scaled, from
 * a head's key blocks (blocks, hs, VLEN); four blocks at a time, so that
 * four sums are in flight and the FMAs do not wait on one another's
 * latency. Each block's sum runs over d in order. */
static void score_keys(float *scores, const float *q, const float *keys, int n, int hs,
                       float scale) {
    int blocks = (n + VLEN - 1) / VLEN, b = 0;
    size_t block = (size_t)hs * VLEN;
    for (; b + 4 <= blocks; b += 4) {
        vfloat dots[4] = {0};
        const float *k = keys + b * block;
        for (int d = 0; d < hs; d++)
            for (int j = 0; j < 4; j++)
                dots[j] += q[d] * *(const vfloat *)(k + j * block + (size_t)d * VLEN);
        for (int j = 0; j < 4; j++) *(vfloat *)(scores + (b + j) * VLEN) = dots[j] * scale;
    }
    for (; b < blocks; b++) {
        vfloat dots = {0};
        for (int d = 0; d < hs; d++)
            dots += q[d] * *(const vfloat *)(keys + b * block + (size_t)d * VLEN);
        *(vfloat *)(scores + b * VLEN) = dots * scale;
    }
}

/* out[d..] (V vectors) = sum_t p_t v_t[d..] (t < n), values (n, hs): the
 * positions split in four interleaved sums (4V independent FMA chains),
 * added at the end. */
static inline __attribute__((always_inline)) void
weigh_vectors(float *out, const float *p, const float *values, int n, int hs, int d, const int V) {
    vfloat acc[4][2] = {0};
    int t = 0;
    for (; t + 4 <= n; t += 4)
        for (int j = 0; j < 4; j++)
            for (int v = 0; v < V; v++)
                acc[j][v] += p[t + j] *
                             *(const vfloat *)(values + (size_t)(t + j) * hs + d + v * VLEN);
    for (; t < n; t++)
        for (int v = 0; v < V; v++)
            acc[0][v] += p[t] * *(const vfloat *)(values + (size_t)t * hs + d + v * VLEN);
    for (int v = 0; v < V; v++)
        *(vfloat *)(out + d + v * VLEN) = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]);
}

/* out (hs) = sum_t p_t v_t (t < n), values (n, hs): two vectors of head
 * dimensions at a time, then one (a head of 48 left a third of its
 * dimensions to the scalar loop), then the last dimensions one by one. */
static void weigh_values(float *out, const float *p, const float *values, int n, int hs) {
    int d = 0;
    for (; d + 2 * VLEN <= hs; d += 2 * VLEN) weigh_vectors(out, p, values, n, hs, d, 2);
    for (; d + VLEN <= hs; d += VLEN) weigh_vectors(out, p, values, n, hs, d, 1);
    for (; d < hs; d++) {
        float acc = 0.0f;
        for (int t = 0; t < n; t++) acc += p[t] * values[(size_t)t * hs + d];
        out[d] = acc;
    }
}

/* att (n, Q) = each row's causal attention of its query q (rotated here for
 * rope) over positions 0..pos of its caches, (row, query head) pairs shared
 * among the team; scores (Tk) are the caller's. Scores past pos are computed
 * from stale keys and never used. Ends in a barrier. */
static void attend(const Step *s, int l, float *att, float *scores, float *q) {
    int hs = s->hs, Tk = s->Tk, NH = s->cfg->NH, group = NH / s->cfg->KVH, Q = NH * hs;
    float scale = 1.0f / sqrtf((float)hs);
    /* pairs dealt in turn: a prompt's later rows attend over more positions,
     * and contiguous shares gave the last thread most of the work */
    #pragma omp for schedule(static, 1)
    for (int rh = 0; rh < s->n * NH; rh++) {
        int r = rh / NH, h = rh % NH, n = s->pos[r] + 1;
        float *qh = q + (size_t)r * Q + h * hs;
        const float *cos = s->angles + (size_t)r * hs;
        if (s->cfg->pos == POS_ROPE) rope_row(qh, cos, cos + hs / 2, 1, hs, 1.0f);
        score_keys(scores, qh, keys_of(s, r, l) + (size_t)(h / group) * hs * Tk, n, hs, scale);
        float maxv = -INFINITY, sum = 0.0f;
        for (int t = 0; t < n; t++) maxv = scores[t] > maxv ? scores[t] : maxv;
        #pragma omp simd reduction(+ : sum)
        for (int t = 0; t < n; t++) {
            scores[t] = fast_expf(scores[t] - maxv);
            sum += scores[t];
        }
        float *ah = att + (size_t)r * Q + h * hs, inv = 1.0f / sum;
        weigh_values(ah, scores, values_of(s, r, l) + (size_t)(h / group) * s->cfg->max_T * hs,
                     n, hs);
        for (int d = 0; d < hs; d++) ah[d] *= inv;
    }
}

/* Rows shared by the team, n of each: q, att (Q), branch (C), k, v (KVC), h (F). */
typedef struct { float *q, *k, *v, *att, *branch, *h; } SharedRows;

/* This thread's rows: x and ln (n, C), its panel outputs (2n, PANEL),
 * attention scores (Tk), and a matmat input quantized (n, 2 max(C, F, Q):
 * quantize_q8's values and magnitudes) with its group scales, for integer
 * weights. */
typedef struct { float *x, *ln, *out, *scores, *qscales; int8_t *q; } OwnRows;

/* The next norm's input gain and bias: the next block's norm1, or after the
 * last block the final norm (a parameter-free one reads NULL). */
static void next_norm(const ModelConfig *cfg, const ModelTensors *w, int l, const float **weight,
                      const float **bias) {
    int last = l + 1 == cfg->num_layers;
    *weight = last ? w->lnf_w : w->layers[l + 1].ln1_w;
    *bias = last ? w->lnf_b : w->layers[l + 1].ln1_b;
}

/* x (n, C) += the shared branch rows, then ln = norm(x) with this gain and bias. */
static void add_and_norm(const ModelConfig *cfg, int n, OwnRows o, const float *branch,
                         const float *weight, const float *bias) {
    int C = cfg->C;
    for (int r = 0; r < n; r++) {
        float *x = o.x + (size_t)r * C;
        for (int c = 0; c < C; c++) x[c] += branch[(size_t)r * C + c];
        norm_row(cfg, o.ln + (size_t)r * C, x, weight, bias);
    }
}

/* x (n, width) as this thread's matmat input. */
static Rows own_rows(const Format *f, OwnRows o, const float *x, int n, int width) {
    return rows_for(f, x, n, width, o.q, o.qscales);
}

/* One block for this thread: x and ln (its private copies) advance, the
 * caches gain the rows' keys and values; ln ends as the next norm's output. */
static void decode_block(const Step *s, const ModelTensors *w, int l, const Format *f,
                         SharedRows r, OwnRows o) {
    const ModelConfig *cfg = s->cfg;
    const LayerTensors *L = &w->layers[l];
    int C = cfg->C, Q = cfg->NH * s->hs, KVC = cfg->KVH * s->hs, F = cfg->F, n = s->n;
    int swiglu = cfg->mlp == MLP_SWIGLU;
    /* each matmat fetches the start of the one after it */
    Ahead k = first_panel(f, L->k, C, KVC), v = first_panel(f, L->v, C, KVC);
    Ahead proj = first_panel(f, L->proj, Q, C);
    Ahead fc1 = first_panel(f, swiglu ? L->gate : L->fc1, C, F);
    Ahead fc2 = first_panel(f, L->fc2, F, C);
    Ahead after = l + 1 < cfg->num_layers ? first_panel(f, w->layers[l + 1].q, C, Q)
                                          : first_panel(f, w->head, C, cfg->V);
    Rows ln = own_rows(f, o, o.ln, n, C);
    matmat(r.q, ln, n, L->q, L->q_b, C, Q, f, ACT_NONE, o.out, k);
    matmat(r.k, ln, n, L->k, L->k_b, C, KVC, f, ACT_NONE, o.out, v);
    matmat(r.v, ln, n, L->v, L->v_b, C, KVC, f, ACT_NONE, o.out, proj);
    #pragma omp barrier
    store_kv(s, l, r.k, r.v);
    attend(s, l, r.att, o.scores, r.q);
    matmat(r.branch, own_rows(f, o, r.att, n, Q), n, L->proj, L->proj_b, Q, C, f, ACT_NONE,
           o.out, fc1);
    #pragma omp barrier
    add_and_norm(cfg, n, o, r.branch, L->ln2_w, L->ln2_b);
    ln = own_rows(f, o, o.ln, n, C);
    if (swiglu)
        matmat_swiglu(r.h, ln, n, L->gate, L->gate_b, L->fc1, L->fc1_b, C, F, f, o.out, fc2);
    else
        matmat(r.h, ln, n, L->fc1, L->fc1_b, C, F, f, cfg->mlp == MLP_RELU ? ACT_RELU : ACT_GELU,
               o.out, fc2);
    #pragma omp barrier
    matmat(r.branch, own_rows(f, o, r.h, n, F), n, L->fc2, L->fc2_b, F, C, f, ACT_NONE, o.out,
           after);
    #pragma omp barrier
    const float *weight, *bias;
    next_norm(cfg, w, l, &weight, &bias);
    /* ln is unused after the last block without a final norm */
    add_and_norm(cfg, n, o, r.branch, weight, bias);
}

/* Every thread keeps its own copy of the residual streams x and their norms,
 * computing them redundantly (n x C values), so no thread waits on another
 * for them: a barrier costs more than the work. Barriers remain only where a
 * matmat's output, split among threads, feeds the next op. */
/* Column j of the head (C, V) as the step stores it, into out (C): what a
 * decoder without a wte of its own (a tied model whose head holds wte
 * exactly, head_holds_wte) looks a token's embedding up in. */
static void head_column(float *out, const void *head, int C, int V, const Format *f, int j) {
    if (f->bits) { /* row j of the integer rows */
        quant_row_values(out, head, C, V, f->bits, f->group, j);
        return;
    }
    size_t row0 = (size_t)(j / PANEL) * C * PANEL; /* the panel's first element */
    int k = j % PANEL, vector = k / VLEN, lane = k % VLEN;
    for (int c = 0; c < C; c++) {
        size_t at = row0 + (size_t)c * PANEL;
        if (f->half == HALF_NONE) out[c] = ((const float *)head)[at + k];
        else if (f->half == HALF_F16) out[c] = (float)((const _Float16 *)head)[at + k];
        else { /* bf16: word vector vector/2, its low half for even vectors */
            uint32_t word = ((const uint32_t *)head)[at / 2 + (size_t)(vector / 2) * VLEN + lane];
            uint32_t bits = (vector % 2 ? word >> 16 : word & 0xffff) << 16;
            memcpy(&out[c], &bits, 4);
        }
    }
}

static Format format_of(int precision, int group) {
    return (Format){panel_half(precision),
                    precision == PRECISION_INT8 ? 8 : precision == PRECISION_INT4 ? 4 : 0, group};
}

int head_holds_wte(const ModelConfig *cfg, const void *head, int precision, int group,
                   const float *wte) {
    Format f = format_of(precision, group);
    float *row = malloc(sizeof(float) * (size_t)cfg->C);
    int same = row != NULL;
    for (int j = 0; same && j < cfg->V; j++) {
        head_column(row, head, cfg->C, cfg->V, &f, j);
        same = !memcmp(row, wte + (size_t)j * cfg->C, sizeof(float) * (size_t)cfg->C);
    }
    free(row);
    return same;
}

/* Row r's input: its token's embedding (from wte, or the head's column),
 * plus its position's where positions are added. */
static void embed(float *x, const ModelConfig *cfg, const ModelTensors *w, const Format *f,
                  int token, int pos) {
    int C = cfg->C;
    if (w->wte) memcpy(x, w->wte + (size_t)token * C, sizeof(float) * C);
    else head_column(x, w->head, C, cfg->V, f, token);
    if (w->wpe)
        for (int c = 0; c < C; c++) x[c] += w->wpe[(size_t)pos * C + c];
}

static int decode_rows(const ModelConfig *cfg, const ModelTensors *w, int precision, int group,
                       float *kcache, float *vcache, int n, const int *slots, const int *tokens,
                       const int *pos, int n_out, const int *out_rows, float *logits) {
    int C = cfg->C, hs = cfg->HS, F = cfg->F, Tk = key_stride(cfg->max_T);
    int Q = cfg->NH * hs, KVC = cfg->KVH * hs, wide = C > F ? C : F;
    wide = wide > Q ? wide : Q;
    Format f = format_of(precision, group);
    /* quantized inputs: 2 n wide bytes (values, magnitudes) and n wide / group
     * scales, in floats */
    size_t quantized = f.bits ? (size_t)n * wide / 2 + 1 + (size_t)n * (wide / group) : 0;
    float *shared = scratch(SCRATCH_DECODE_ROWS, (size_t)n * (2 * Q + C + 2 * KVC + F + hs));
    if (!shared) return take_status();
    SharedRows r;
    r.q = shared;
    r.k = r.q + (size_t)n * Q;
    r.v = r.k + (size_t)n * KVC;
    r.att = r.v + (size_t)n * KVC;
    r.branch = r.att + (size_t)n * Q;
    r.h = r.branch + (size_t)n * C;
    float *angles = r.h + (size_t)n * F;
    if (cfg->pos == POS_ROPE)
        for (int i = 0; i < n; i++)
            rope_angles(angles + (size_t)i * hs, angles + (size_t)i * hs + hs / 2, pos[i], hs, cfg);
    Step s = {cfg, n, hs, Tk, pos, slots, angles, kcache, vcache};
    int failed = 0;
    /* one thread for models whose matrices fit in a core's cache anyway */
    #pragma omp parallel if ((long)C * C * n >= 128 * 128)
    {
        float *own = scratch(SCRATCH_DECODE_OWN,
                             (size_t)3 * n * C + 2 * (size_t)n * PANEL + Tk + quantized);
        if (!own) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        #pragma omp barrier
        if (!__atomic_load_n(&failed, __ATOMIC_RELAXED)) {
            OwnRows o = {own, own + (size_t)n * C, own + 2 * (size_t)n * C, NULL, NULL, NULL};
            o.scores = o.out + 2 * (size_t)n * PANEL;
            o.qscales = o.scores + Tk + (size_t)n * C; /* after the head's rows (last) */
            o.q = (int8_t *)(o.qscales + (size_t)n * (wide / (group > 0 ? group : 1)));
            for (int i = 0; i < n; i++) {
                float *x = o.x + (size_t)i * C;
                embed(x, cfg, w, &f, tokens[i], pos[i]);
                norm_row(cfg, o.ln + (size_t)i * C, x, w->layers[0].ln1_w, w->layers[0].ln1_b);
            }
            for (int l = 0; l < cfg->num_layers; l++) decode_block(&s, w, l, &f, r, o);
            /* the head for the rows whose logits are wanted only: a prompt's
             * other rows just fill the cache */
            float *last = o.scores + Tk;
            for (int i = 0; i < n_out; i++)
                memcpy(last + (size_t)i * C, (cfg->final_norm ? o.ln : o.x) +
                       (size_t)out_rows[i] * C, sizeof(float) * C);
            if (!w->head) { /* the final hidden states themselves */
                if (omp_get_thread_num() == 0)
                    memcpy(logits, last, sizeof(float) * (size_t)n_out * C);
            } else
                matmat(logits, own_rows(&f, o, last, n_out, C), n_out, w->head, NULL, C, cfg->V,
                       &f, ACT_NONE, o.out, (Ahead){NULL, 0});
        }
    }
    return take_status();
}

/* One governed unit (governor.c), keyed by the model's weights and sized by
 * its rows. */
int decode_batch(const ModelConfig *cfg, const ModelTensors *w, int precision, int group,
                 float *kcache, float *vcache, int n, const int *slots, const int *tokens,
                 const int *pos, int n_out, const int *out_rows, float *logits) {
    threads_unit_begin(w->wte ? (const void *)w->wte : w->head, n);
    int status = decode_rows(cfg, w, precision, group, kcache, vcache, n, slots, tokens, pos,
                             n_out, out_rows, logits);
    threads_unit_end();
    return status;
}

int decode_step(const ModelConfig *cfg, const ModelTensors *w, int precision, int group,
                float *kcache, float *vcache, int token, int pos, float *logits) {
    int slot = 0, row = 0;
    return decode_batch(cfg, w, precision, group, kcache, vcache, 1, &slot, &token, &pos, 1,
                        &row, logits);
}
