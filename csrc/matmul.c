/* Matrix multiply, the kernel's hot op.
 *
 * Weights keep the (in, out) orientation: out (N,OC) = inp (N,C) @ W (C,OC).
 * Every product is reduced to one routine, gemm: c (M,N) (+)= A (M,K) @ B (K,N),
 * row-major c, with both operands read through strides, so that transposes
 * (dweight = inp^T @ dout, dinp = dout @ W^T) need no copy and one tuned
 * routine serves forward, dinp and dweight. B is packed into contiguous
 * column panels (zero-padded to whole panels), which the register tile
 * streams in order; A is read in place, or packed into row tiles when it is a
 * transposed operand.
 *
 * Three ways to share the work (gemm picks): many rows (forward, dinp: M is
 * the token count) go in blocks of rows to the threads, each tile summing all
 * of K at once; a long K (dweight: K is the token count) is split between
 * the threads, each summing its share with no barrier until one final add;
 * inside attention's parallel region, one thread runs the whole product.
 */
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "kernel.h"

/* Register tile: up to MR rows by NV vectors. With AVX-512 (32 registers)
 * that is 6 x 64 floats in 24 zmm accumulators, each k step loading 4
 * vectors of b and broadcasting 6 scalars of a: 24 FMAs per 10 loads (a 4 x 4
 * tile reached about 75% of the FMA peak on Intel cores, 6 x 4 about 85%).
 * With 16 registers (AVX2, SSE, NEON's 128-bit lanes) 6 x 2 keeps every
 * accumulator in a register. */
#define MR 6
#if VLEN == 16
#define NV 4
#else
#define NV 2
#endif
#define NR (NV * VLEN)
/* K block: a KC x NR panel of B (48 KB) stays in L1/L2 while every row tile uses it. */
#define KC 192


/* c[mr, nv vectors] (+)= A[mr, K] @ b[K, nv vectors], accumulators in
 * registers; with GEMM_OVERWRITE, c's old values are neither read nor kept
 * (saves a pass over the output in forward), with GEMM_RELU the stored sums
 * are clamped at 0 (fc1's activation, fused). Always inlined with constant
 * mr and nv, so each case is fully unrolled.
 *
 * The accumulators are named variables c<row><vector>, expanded by FOR_TILE,
 * not an array: with an array GCC 12 rotates the last row's accumulators
 * through the b registers, four extra moves per k step on the ports the
 * FMAs need (the matmul ran at about two thirds of its speed on Intel cores). */
#define FOR_ROW(X, r) X(r, 0) X(r, 1) X(r, 2) X(r, 3)
#define FOR_TILE(X) FOR_ROW(X, 0) FOR_ROW(X, 1) FOR_ROW(X, 2) FOR_ROW(X, 3) \
                    FOR_ROW(X, 4) FOR_ROW(X, 5)
_Static_assert(MR <= 6 && NV <= 4, "FOR_TILE spells out at most 6 x 4");

static inline __attribute__((always_inline)) void
micro_tile(float *c, const float *a, long rs, long cs, const float *b, int K, int ldb, int ldc,
           const int mr, const int nv, int flags) {
    const vfloat zero = {0};
    int overwrite = flags & GEMM_OVERWRITE, relu = flags & GEMM_RELU;
#define IN_TILE(r, v) ((r) < mr && (v) < nv)
#define AT(r, v) (c + (size_t)(r) * ldc + (v) * VLEN)
#define DECLARE(r, v) \
    vfloat c##r##v = IN_TILE(r, v) && !overwrite ? *(const vfloat *)AT(r, v) : zero;
    FOR_TILE(DECLARE)
    for (int p = 0; p < K; p++) {
        const float *brow = b + (size_t)p * ldb;
        const float *acol = a + p * cs;
        vfloat b0 = nv > 0 ? *(const vfloat *)brow : zero;
        vfloat b1 = nv > 1 ? *(const vfloat *)(brow + VLEN) : zero;
        vfloat b2 = nv > 2 ? *(const vfloat *)(brow + 2 * VLEN) : zero;
        vfloat b3 = nv > 3 ? *(const vfloat *)(brow + 3 * VLEN) : zero;
#define FMA(r, v) if (IN_TILE(r, v)) c##r##v += acol[(r) * rs] * b##v;
        FOR_TILE(FMA)
    }
    if (relu) { /* positive lanes keep their bits, the others become +0 */
#define RELU(r, v) if (IN_TILE(r, v)) c##r##v = (vfloat)((vint)c##r##v & (c##r##v > zero));
        FOR_TILE(RELU)
    }
#define STORE(r, v) if (IN_TILE(r, v)) *(vfloat *)AT(r, v) = c##r##v;
    FOR_TILE(STORE)
#undef IN_TILE
#undef AT
#undef DECLARE
#undef FMA
#undef RELU
#undef STORE
}

/* nv cases beyond NV are never taken; the guard keeps them out of the build */
#define NV_CASE(mr, nv) \
    case nv: if (nv <= NV) micro_tile(c, a, rs, cs, b, K, ldb, ldc, mr, nv, flags); break;
#define TILE_CASES(mr) \
    switch (nv) { NV_CASE(mr, 4) NV_CASE(mr, 3) NV_CASE(mr, 2) NV_CASE(mr, 1) }

/* One tile of mr <= MR rows and nv <= NV whole vectors. */
static void tile(float *c, const float *a, long rs, long cs, const float *b, int K, int ldb,
                 int ldc, int mr, int nv, int flags) {
    switch (mr) {
    case 6: TILE_CASES(6) break;
    case 5: TILE_CASES(5) break;
    case 4: TILE_CASES(4) break;
    case 3: TILE_CASES(3) break;
    case 2: TILE_CASES(2) break;
    case 1: TILE_CASES(1) break;
    }
}

/* Rows [k0, k0 + kc) of B's columns [j0, j0 + NR) as a kc x NR block,
 * columns past N zero. */
static void pack_panel(float *panel, Strided B, int k0, int kc, int j0, int N) {
    int nr = N - j0 < NR ? N - j0 : NR;
    for (int p = 0; p < kc; p++) {
        float *row = panel + (size_t)p * NR;
        const float *src = B.a + (size_t)(k0 + p) * B.rs + (size_t)j0 * B.cs;
        if (B.cs == 1) memcpy(row, src, sizeof(float) * nr);
        else for (int j = 0; j < nr; j++) row[j] = src[(size_t)j * B.cs];
        if (nr < NR) memset(row + nr, 0, sizeof(float) * (NR - nr));
    }
}

/* A tile whose columns end inside a vector: computed whole over the padded
 * panel into a buffer, of which only the real columns reach c. */
static void edge_tile(float *c, Strided A, const float *panel, int kc, int ldc, int mr, int nr,
                      int flags) {
    float buf[MR * NR] __attribute__((aligned(64)));
    tile(buf, A.a, A.rs, A.cs, panel, kc, NR, NR, mr, (nr + VLEN - 1) / VLEN, GEMM_OVERWRITE);
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) {
            float *cj = c + (size_t)r * ldc + j;
            float sum = (flags & GEMM_OVERWRITE ? 0.0f : *cj) + buf[r * NR + j];
            *cj = flags & GEMM_RELU && !(sum > 0.0f) ? 0.0f : sum;
        }
}

/* The tile of c at (i, j) over a kc-deep panel; At starts at the tile's
 * first row of A. */
static void any_tile(float *c, Strided At, const float *panel, int kc, int i, int j, int M,
                     int N, int flags) {
    int mr = M - i < MR ? M - i : MR, nr = N - j < NR ? N - j : NR;
    float *ct = c + (size_t)i * N + j;
    if (nr % VLEN == 0) tile(ct, At.a, At.rs, At.cs, panel, kc, NR, N, mr, nr / VLEN, flags);
    else edge_tile(ct, At, panel, kc, N, mr, nr, flags);
}

/* Row i of A onward, from column k0. */
static Strided from(Strided A, int i, int k0) {
    Strided At = {A.a + (size_t)i * A.rs + (size_t)k0 * A.cs, A.rs, A.cs};
    return At;
}

/* Rows [i0, i0 + mr) and columns [k0, k0 + kc) of A as kc x MR (column k of
 * the tile's rows together), for an A read across rows (a transposed
 * operand), whose tile would otherwise touch a new cache line every k. */
static void pack_rows(float *dst, Strided A, int i0, int mr, int k0, int kc) {
    for (int p = 0; p < kc; p++)
        for (int r = 0; r < mr; r++)
            dst[p * MR + r] = A.a[(size_t)(i0 + r) * A.rs + (size_t)(k0 + p) * A.cs];
}

/* One thread: c (M,N) (+)= A @ B block by block over K, each B block packed
 * into panels (or used in place when it already is one panel), and with
 * pack_a each A block into row tiles. */
static void gemm_serial(float *c, Strided A, Strided B, int M, int N, int K, int flags,
                        int pack_a) {
    int mt = (M + MR - 1) / MR, nt = (N + NR - 1) / NR, kmax = K < KC ? K : KC;
    if (K == 0) { /* an empty sum (a split-K share can be empty) */
        for (size_t i = 0; i < (size_t)M * N; i++)
            c[i] = flags & GEMM_OVERWRITE || (flags & GEMM_RELU && !(c[i] > 0.0f)) ? 0.0f : c[i];
        return;
    }
    float *packed = scratch(SCRATCH_PACKED_B, (size_t)nt * NR * kmax);
    float *rows = pack_a ? scratch(SCRATCH_PACKED_A, (size_t)mt * MR * kmax) : NULL;
    if (!packed || (pack_a && !rows)) return; /* noted for the caller's status */
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        /* overwrite on the first K block, relu after the last */
        int mode = (k0 == 0 ? flags & GEMM_OVERWRITE : 0) | (k0 + kc >= K ? flags & GEMM_RELU : 0);
        /* a B already laid out as one panel (attention's blocks) is used in place */
        int in_place = N == NR && B.rs == NR && B.cs == 1;
        const float *panels = in_place ? B.a + (size_t)k0 * NR : packed;
        if (!in_place)
            for (int jt = 0; jt < nt; jt++)
                pack_panel(packed + (size_t)jt * kc * NR, B, k0, kc, jt * NR, N);
        for (int it = 0; it < mt && pack_a; it++)
            pack_rows(rows + (size_t)it * MR * kc, A, it * MR, M - it * MR < MR ? M - it * MR : MR,
                      k0, kc);
        for (int jt = 0; jt < nt; jt++) /* consecutive row tiles share a panel */
            for (int it = 0; it < mt; it++) {
                Strided At = pack_a ? (Strided){rows + (size_t)it * MR * kc, 1, MR}
                                    : from(A, it * MR, k0);
                any_tile(c, At, panels + (size_t)jt * kc * NR, kc, it * MR, jt * NR, M, N, mode);
            }
    }
}

/* Row tiles per block in the parallel product: a block's rows of A (RB * MR
 * x K) stay in L1/L2 while every panel of B passes over them. */
#define RB 4

/* All threads over one product: all of B packed once (each panel K deep),
 * then blocks of rows x one panel each, every tile summing the whole K in
 * registers, so c is written once and never read back (with OVERWRITE). */
static void gemm_rows(float *c, Strided A, Strided B, int M, int N, int K, int flags) {
    int mt = (M + MR - 1) / MR, nt = (N + NR - 1) / NR, mb = (mt + RB - 1) / RB;
    int in_place = N == NR && B.rs == NR && B.cs == 1;
    /* shared by the team */
    float *packed = in_place ? NULL : scratch(SCRATCH_PACKED_B, (size_t)nt * NR * K);
    const float *panels = in_place ? B.a : packed;
    if (!panels) return;
    #pragma omp parallel
    {
        if (!in_place) {
            #pragma omp for schedule(static)
            for (int jt = 0; jt < nt; jt++)
                pack_panel(packed + (size_t)jt * K * NR, B, 0, K, jt * NR, N);
        }
        #pragma omp for collapse(2) schedule(static)
        for (int ib = 0; ib < mb; ib++)
            for (int jt = 0; jt < nt; jt++)
                for (int it = ib * RB; it < mt && it < (ib + 1) * RB; it++)
                    any_tile(c, from(A, it * MR, 0), panels + (size_t)jt * K * NR, K, it * MR,
                             jt * NR, M, N, flags);
    }
}

/* A long K (dweight: K is the token count) split between the threads: each
 * sums its share of K into its own (M,N) buffer with no barrier between K
 * blocks, then the partial sums are added in thread order. */
static void gemm_split_k(float *c, Strided A, Strided B, int M, int N, int K, int flags) {
    /* the default team, as every other region uses: a team of another size
     * would make OpenMP end and restart pool threads, and with them their
     * per-thread scratch buffers */
    float *parts[omp_get_max_threads()];
    #pragma omp parallel
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int k0 = (int)((long)K * t / n), k1 = (int)((long)K * (t + 1) / n);
        Strided At = from(A, 0, k0), Bt = {B.a + (size_t)k0 * B.rs, B.rs, B.cs};
        /* thread 0 sums into c itself; the others into their own buffers */
        parts[t] = t == 0 ? c : scratch(SCRATCH_SPLIT_K, (size_t)M * N);
        if (parts[t])
            gemm_serial(parts[t], At, Bt, M, N, k1 - k0,
                        t == 0 ? flags & GEMM_OVERWRITE : GEMM_OVERWRITE, A.cs != 1);
        #pragma omp barrier
        int complete = 1; /* every share summed (else the failure is noted) */
        for (int p = 1; p < n; p++) complete &= parts[p] != NULL;
        #pragma omp for schedule(static)
        for (int i = 0; i < (complete ? M : 0); i++) {
            float *row = c + (size_t)i * N;
            for (int p = 1; p < n; p++) {
                const float *part = parts[p] + (size_t)i * N;
                #pragma omp simd
                for (int j = 0; j < N; j++) row[j] += part[j];
            }
            if (flags & GEMM_RELU)
                for (int j = 0; j < N; j++) row[j] = row[j] > 0.0f ? row[j] : 0.0f;
        }
    }
}

/* c (M,N) (+)= A (M,K) @ B (K,N) (see kernel.h for flags). Inside another
 * parallel region (attention), or when too small to share, it runs on the
 * calling thread alone; a K at least as long as M and N is split between
 * the threads, anything else shares out blocks of rows. Each element's sum runs
 * over k in a fixed order for a given thread count. */
void gemm(float *c, Strided A, Strided B, int M, int N, int K, int flags) {
    if (omp_in_parallel() || (long)M * N * K <= 32768 || omp_get_max_threads() == 1)
        gemm_serial(c, A, B, M, N, K, flags, 0);
    else if (K >= M && K >= N)
        gemm_split_k(c, A, B, M, N, K, flags);
    else
        gemm_rows(c, A, B, M, N, K, flags);
}

/* c (N,OC) = bias broadcast over rows (c is then summed into). */
static void fill_bias(float *c, const float *bias, int N, int OC) {
    #pragma omp parallel for schedule(static) if ((long)N * OC > PARALLEL_MIN)
    for (int i = 0; i < N; i++) memcpy(c + (size_t)i * OC, bias, sizeof(float) * OC);
}

/* out (N,OC) = inp (N,C) @ W + bias, with extra flags (GEMM_RELU). */
static int linear(float *out, const float *inp, Strided W, const float *bias, int N, int C,
                  int OC, int flags) {
    Strided A = {inp, C, 1};
    if (bias) fill_bias(out, bias, N, OC);
    gemm(out, A, W, N, OC, C, flags | (bias ? 0 : GEMM_OVERWRITE));
    return take_status();
}

int matmul_forward(float *out, const float *inp, const float *weight,
                   const float *bias, int N, int C, int OC) {
    Strided W = {weight, OC, 1};
    return linear(out, inp, W, bias, N, C, OC, 0);
}

int matmul_relu_forward(float *out, const float *inp, const float *weight, const float *bias,
                        int N, int C, int OC) {
    Strided W = {weight, OC, 1};
    return linear(out, inp, W, bias, N, C, OC, GEMM_RELU);
}

int matmul_t_forward(float *out, const float *inp, const float *wte, int N, int C, int V) {
    Strided Wt = {wte, 1, C}; /* element (c, v) of wte^T is wte[v * C + c] */
    return linear(out, inp, Wt, NULL, N, C, V, 0);
}

/* dbias (OC) += column sums of dout (N,OC): each thread owns a slice of
 * columns and sums rows in order. */
static void bias_backward(float *dbias, const float *dout, int N, int OC) {
    #pragma omp parallel for schedule(static) if ((long)N * OC > PARALLEL_MIN)
    for (int j0 = 0; j0 < OC; j0 += 64)
        for (int i = 0; i < N; i++)
            for (int j = j0; j < OC && j < j0 + 64; j++)
                dbias[j] += dout[(size_t)i * OC + j];
}

int matmul_backward(float *dinp, float *dweight, float *dbias,
                    const float *dout, const float *inp, const float *weight,
                    int N, int C, int OC, int dinp_accumulate) {
    if (dinp) { /* dinp (N,C) (+)= dout (N,OC) @ W^T (OC,C) */
        Strided D = {dout, OC, 1}, Wt = {weight, 1, OC};
        gemm(dinp, D, Wt, N, C, OC, dinp_accumulate ? 0 : GEMM_OVERWRITE);
    }
    if (dweight) { /* dW (C,OC) += inp^T (C,N) @ dout (N,OC) */
        Strided At = {inp, 1, C}, D = {dout, OC, 1};
        gemm(dweight, At, D, C, OC, N, 0);
    }
    if (dbias) bias_backward(dbias, dout, N, OC);
    return take_status();
}

int matmul_t_backward(float *dinp, float *dwte, const float *dout, const float *inp,
                      const float *wte, int N, int C, int V) {
    /* dinp (N,C) = dout (N,V) @ wte (V,C) */
    Strided D = {dout, V, 1}, W = {wte, C, 1};
    gemm(dinp, D, W, N, C, V, GEMM_OVERWRITE);
    /* dwte (V,C) += dout^T (V,N) @ inp (N,C), unless wte is frozen */
    Strided Dt = {dout, 1, V}, X = {inp, C, 1};
    if (dwte) gemm(dwte, Dt, X, V, C, N, 0);
    return take_status();
}
