/* Matrix multiply, the kernel's hot op.
 *
 * Weights keep the (in, out) orientation: out (N,OC) = inp (N,C) @ W (C,OC).
 * Every product is reduced to one routine, gemm_acc: c (M,N) += a (M,K) @ b (K,N),
 * all row-major. Backward transposes an operand into scratch (cheap, memory-bound)
 * so that one tuned routine serves forward, dinp and dweight.
 */
#include <stdlib.h>
#include <string.h>
#include "kernel.h"

/* Register tile: MR rows by NV vectors. With AVX-512 that is 4 x 64 floats held
 * in 16 zmm accumulators, each k step loading 4 vectors of b and broadcasting 4
 * scalars of a: 16 FMAs per 8 loads. */
#define MR 4
#define NV 4
#define NR (NV * VLEN)
/* K block: a KC x NR panel of b (64 KB) stays in L2 while every row tile uses it. */
#define KC 256

/* Reference version: the obvious triple loop, used for edge tiles. */
static void gemm_acc_naive(float *c, const float *a, const float *b, int M,
                           int N, int K, int lda, int ldb, int ldc) {
    for (int i = 0; i < M; i++)
        for (int p = 0; p < K; p++) {
            float ai = a[(size_t)i * lda + p];
            const float *brow = b + (size_t)p * ldb;
            float *crow = c + (size_t)i * ldc;
            for (int j = 0; j < N; j++) crow[j] += ai * brow[j];
        }
}

/* c[MR, NR] += a[MR, K] @ b[K, NR], accumulators in registers. */
static inline void micro_tile(float *c, const float *a, const float *b, int K,
                              int lda, int ldb, int ldc) {
    vfloat acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++)
            acc[r][v] = *(const vfloat *)(c + (size_t)r * ldc + v * VLEN);
    for (int p = 0; p < K; p++) {
        const float *brow = b + (size_t)p * ldb;
        vfloat bv[NV];
        for (int v = 0; v < NV; v++) bv[v] = *(const vfloat *)(brow + v * VLEN);
        for (int r = 0; r < MR; r++) {
            float ar = a[(size_t)r * lda + p];
            for (int v = 0; v < NV; v++) acc[r][v] += ar * bv[v];
        }
    }
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++)
            *(vfloat *)(c + (size_t)r * ldc + v * VLEN) = acc[r][v];
}

/* c (M,N) += a (M,K) @ b (K,N). Tiles are independent, so the result is the
 * same for any thread count. */
static void gemm_acc(float *c, const float *a, const float *b, int M, int N,
                     int K) {
    int mt = (M + MR - 1) / MR, nt = (N + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += KC) {
        int kc = K - k0 < KC ? K - k0 : KC;
        /* column panel outer, row tile inner: consecutive iterations share the b panel */
        #pragma omp parallel for collapse(2) schedule(static) if ((long)M * N * kc > 32768)
        for (int jt = 0; jt < nt; jt++)
            for (int it = 0; it < mt; it++) {
                int i = it * MR, j = jt * NR;
                int mr = M - i < MR ? M - i : MR, nr = N - j < NR ? N - j : NR;
                float *ct = c + (size_t)i * N + j;
                const float *at = a + (size_t)i * K + k0;
                const float *bt = b + (size_t)k0 * N + j;
                if (mr == MR && nr == NR)
                    micro_tile(ct, at, bt, kc, K, N, N);
                else
                    gemm_acc_naive(ct, at, bt, mr, nr, kc, K, N, N);
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
    #pragma omp parallel for schedule(static) if ((long)N * OC > 65536)
    for (int i = 0; i < N; i++) {
        float *row = out + (size_t)i * OC;
        if (bias) memcpy(row, bias, sizeof(float) * OC);
        else memset(row, 0, sizeof(float) * OC);
    }
    gemm_acc(out, inp, weight, N, OC, C);
}

void matmul_backward(float *dinp, float *dweight, float *dbias,
                     const float *dout, const float *inp, const float *weight,
                     int N, int C, int OC) {
    if (dinp) { /* dinp (N,C) += dout (N,OC) @ W^T (OC,C) */
        float *wt = scratch(0, (size_t)OC * C);
        transpose(wt, weight, C, OC);
        gemm_acc(dinp, dout, wt, N, C, OC);
    }
    if (dweight) { /* dW (C,OC) += inp^T (C,N) @ dout (N,OC) */
        float *inpt = scratch(1, (size_t)C * N);
        transpose(inpt, inp, N, C);
        gemm_acc(dweight, inpt, dout, C, OC, N);
    }
    if (dbias) { /* each thread owns a slice of columns and sums rows in order */
        #pragma omp parallel for schedule(static) if ((long)N * OC > 65536)
        for (int j0 = 0; j0 < OC; j0 += 64)
            for (int i = 0; i < N; i++)
                for (int j = j0; j < OC && j < j0 + 64; j++)
                    dbias[j] += dout[(size_t)i * OC + j];
    }
}
