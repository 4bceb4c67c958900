/* Matrix multiply, the kernel's hot op.
 *
 * Weights keep the (in, out) orientation: out (N,OC) = inp (N,C) @ W (C,OC).
 * Every product is reduced to one routine, gemm: c (M,N) (+)= A (M,K) @ b (K,N),
 * row-major, where A may be read transposed in place (dweight = inp^T @ dout)
 * and only the small W^T of dinp is copied, so that one tuned routine serves
 * forward, dinp and dweight.
 */
#include <stdlib.h>
#include <string.h>
#include "kernel.h"

/* Register tile: up to MR rows by NV vectors. With AVX-512 that is 4 x 64
 * floats held in 16 zmm accumulators, each k step loading 4 vectors of b and
 * broadcasting 4 scalars of a: 16 FMAs per 8 loads. */
#define MR 4
#define NV 4
#define NR (NV * VLEN)
/* K block: a KC x NR panel of b (128 KB) stays in L2 while every row tile uses it. */
#define KC 512

/* A operand with strides, so a transposed matrix needs no copy:
 * element (r, p) is at a[r * rs + p * cs]. */
typedef struct { const float *a; long rs, cs; } Strided;

/* Reference version: the obvious triple loop, used for the last columns
 * that do not fill a vector. */
static void gemm_acc_naive(float *c, Strided A, const float *b, int M, int N, int K,
                           int ldb, int ldc) {
    for (int i = 0; i < M; i++)
        for (int p = 0; p < K; p++) {
            float ai = A.a[i * A.rs + p * A.cs];
            const float *brow = b + (size_t)p * ldb;
            float *crow = c + (size_t)i * ldc;
            for (int j = 0; j < N; j++) crow[j] += ai * brow[j];
        }
}

/* c[mr, nv vectors] (+)= A[mr, K] @ b[K, nv vectors], accumulators in
 * registers; with overwrite, c's old values are neither read nor kept (saves
 * a pass over the output in forward). Always inlined with constant mr and
 * nv, so each case is fully unrolled. */
static inline __attribute__((always_inline)) void
micro_tile(float *c, Strided A, const float *b, int K, int ldb, int ldc, const int mr,
           const int nv, int overwrite) {
    vfloat acc[MR][NV];
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++)
            acc[r][v] = overwrite ? (vfloat){0} : *(const vfloat *)(c + (size_t)r * ldc + v * VLEN);
    for (int p = 0; p < K; p++) {
        const float *brow = b + (size_t)p * ldb;
        const float *acol = A.a + p * A.cs;
        vfloat bv[NV];
        for (int v = 0; v < nv; v++) bv[v] = *(const vfloat *)(brow + v * VLEN);
        for (int r = 0; r < mr; r++) {
            float ar = acol[r * A.rs];
            for (int v = 0; v < nv; v++) acc[r][v] += ar * bv[v];
        }
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++)
            *(vfloat *)(c + (size_t)r * ldc + v * VLEN) = acc[r][v];
}

#define TILE_CASES(mr)                                                     \
    switch (nv) {                                                          \
    case 4: micro_tile(c, A, b, K, ldb, ldc, mr, 4, overwrite); break;     \
    case 3: micro_tile(c, A, b, K, ldb, ldc, mr, 3, overwrite); break;     \
    case 2: micro_tile(c, A, b, K, ldb, ldc, mr, 2, overwrite); break;     \
    case 1: micro_tile(c, A, b, K, ldb, ldc, mr, 1, overwrite); break;     \
    }

/* One tile of mr <= MR rows and nv <= NV whole vectors. */
static void tile(float *c, Strided A, const float *b, int K, int ldb, int ldc, int mr,
                 int nv, int overwrite) {
    switch (mr) {
    case 4: TILE_CASES(4) break;
    case 3: TILE_CASES(3) break;
    case 2: TILE_CASES(2) break;
    case 1: TILE_CASES(1) break;
    }
}

/* c (M,N) += A (M,K) @ b (K,N), or = with overwrite. Tiles are independent
 * and each sums over k in order, so the result is the same for any thread
 * count. */
static void gemm(float *c, Strided A, const float *b, int M, int N, int K, int overwrite) {
    int mt = (M + MR - 1) / MR, nt = (N + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        Strided Ak = {A.a + k0 * A.cs, A.rs, A.cs};
        /* column panel outer, row tile inner: consecutive iterations share the b panel */
        #pragma omp parallel for collapse(2) schedule(static) if ((long)M * N * kc > 32768)
        for (int jt = 0; jt < nt; jt++)
            for (int it = 0; it < mt; it++) {
                int i = it * MR, j = jt * NR;
                int mr = M - i < MR ? M - i : MR, nr = N - j < NR ? N - j : NR;
                float *ct = c + (size_t)i * N + j;
                Strided At = {Ak.a + i * Ak.rs, Ak.rs, Ak.cs};
                const float *bt = b + (size_t)k0 * N + j;
                int nv = nr / VLEN, tail = nr % VLEN, first = overwrite && k0 == 0;
                if (nv) tile(ct, At, bt, kc, N, N, mr, nv, first);
                if (tail) {
                    if (first)
                        for (int r = 0; r < mr; r++)
                            memset(ct + (size_t)r * N + nv * VLEN, 0, sizeof(float) * tail);
                    gemm_acc_naive(ct + nv * VLEN, At, bt + nv * VLEN, mr, tail, kc, N, N);
                }
            }
    }
}

/* dst (cols,rows) = src (rows,cols)^T, in cache-sized blocks. */
static void transpose(float *dst, const float *src, int rows, int cols) {
    #pragma omp parallel for schedule(static) if ((long)rows * cols > 65536)
    for (int i0 = 0; i0 < rows; i0 += 32)
        for (int j0 = 0; j0 < cols; j0 += 32)
            for (int i = i0; i < rows && i < i0 + 32; i++)
                for (int j = j0; j < cols && j < j0 + 32; j++)
                    dst[(size_t)j * rows + i] = src[(size_t)i * cols + j];
}

void matmul_forward(float *out, const float *inp, const float *weight,
                    const float *bias, int N, int C, int OC) {
    Strided A = {inp, C, 1};
    if (!bias) {
        gemm(out, A, weight, N, OC, C, 1);
        return;
    }
    #pragma omp parallel for schedule(static) if ((long)N * OC > 65536)
    for (int i = 0; i < N; i++) memcpy(out + (size_t)i * OC, bias, sizeof(float) * OC);
    gemm(out, A, weight, N, OC, C, 0);
}

void matmul_backward(float *dinp, float *dweight, float *dbias,
                     const float *dout, const float *inp, const float *weight,
                     int N, int C, int OC) {
    if (dinp) { /* dinp (N,C) += dout (N,OC) @ W^T (OC,C): W^T is small, copy it */
        float *wt = scratch(0, (size_t)OC * C);
        transpose(wt, weight, C, OC);
        Strided A = {dout, OC, 1};
        gemm(dinp, A, wt, N, C, OC, 0);
    }
    if (dweight) { /* dW (C,OC) += inp^T (C,N) @ dout (N,OC): inp read transposed in place */
        Strided A = {inp, 1, C};
        gemm(dweight, A, dout, C, OC, N, 0);
    }
    if (dbias) { /* each thread owns a slice of columns and sums rows in order */
        #pragma omp parallel for schedule(static) if ((long)N * OC > 65536)
        for (int j0 = 0; j0 < OC; j0 += 64)
            for (int i = 0; i < N; i++)
                for (int j = j0; j < OC && j < j0 + 64; j++)
                    dbias[j] += dout[(size_t)i * OC + j];
    }
}
