/* Normalization over the last axis (C): layer normalization and RMSNorm,
 * each with or without a learnable gain (weight, C) and, for layernorm, bias
 * (C); NULL means parameter-free.
 * inp, out, dinp, dout, dskip are (N,C); mean and rstd are (N), saved by forward.
 * Backward writes dinp = dskip + (gradient through the norm): the residual
 * stream's skip connection, explicit (dskip NULL: no skip, may equal dinp).
 */
#include <math.h>
#include "kernel.h"

#define PAR_IF(N, C) if ((long)(N) * (C) > PARALLEL_MIN)

/* One row: y = normalized x (with gain and bias if given); returns rstd and
 * stores the mean. Decoding calls it directly, inside its own parallel region. */
float layernorm_row(float *y, float *mean, const float *x, const float *weight,
                    const float *bias, int C, float eps) {
    float m = 0.0f;
    #pragma omp simd reduction(+ : m)
    for (int j = 0; j < C; j++) m += x[j];
    m /= C;
    float var = 0.0f; /* two passes: no cancellation for large means */
    #pragma omp simd reduction(+ : var)
    for (int j = 0; j < C; j++) var += (x[j] - m) * (x[j] - m);
    float s = 1.0f / sqrtf(var / C + eps);
    for (int j = 0; j < C; j++) {
        float n = (x[j] - m) * s;
        y[j] = n * (weight ? weight[j] : 1.0f) + (bias ? bias[j] : 0.0f);
    }
    *mean = m;
    return s;
}

/* One row: y = x / sqrt(mean(x^2) + eps) (times the gain if given); returns rstd. */
float rmsnorm_row(float *y, const float *x, const float *weight, int C, float eps) {
    float ss = 0.0f;
    #pragma omp simd reduction(+ : ss)
    for (int j = 0; j < C; j++) ss += x[j] * x[j];
    float s = 1.0f / sqrtf(ss / C + eps);
    for (int j = 0; j < C; j++) y[j] = x[j] * s * (weight ? weight[j] : 1.0f);
    return s;
}

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int N, int C,
                       float eps) {
    #pragma omp parallel for schedule(static) PAR_IF(N, C)
    for (int i = 0; i < N; i++)
        rstd[i] = layernorm_row(out + (size_t)i * C, mean + i, inp + (size_t)i * C, weight, bias,
                                C, eps);
}

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight,
                     int N, int C, float eps) {
    #pragma omp parallel for schedule(static) PAR_IF(N, C)
    for (int i = 0; i < N; i++)
        rstd[i] = rmsnorm_row(out + (size_t)i * C, inp + (size_t)i * C, weight, C, eps);
}

/* The gain and bias gradients sum over rows: columns split across threads,
 * rows in order. xhat = (x - mean) * rstd (mean NULL: RMSNorm's x * rstd). */
static void gain_backward(float *dweight, float *dbias, const float *dout, const float *inp,
                          const float *mean, const float *rstd, int N, int C) {
    if (!dweight && !dbias) return;
    #pragma omp parallel for schedule(static) PAR_IF(N, C)
    for (int j0 = 0; j0 < C; j0 += 16)
        for (int i = 0; i < N; i++) {
            const float *x = inp + (size_t)i * C, *dy = dout + (size_t)i * C;
            float m = mean ? mean[i] : 0.0f;
            for (int j = j0; j < C && j < j0 + 16; j++) {
                if (dweight) dweight[j] += dy[j] * (x[j] - m) * rstd[i];
                if (dbias) dbias[j] += dy[j];
            }
        }
}

/* Both norms' input gradient, g = dout * weight, xhat as above:
 * layernorm: dinp = dskip + rstd * (g - mean(g) - xhat * mean(g * xhat))
 * RMSNorm:   dinp = dskip + rstd * (g - xhat * mean(g * xhat)) */
static void norm_input_backward(float *dinp, const float *dskip, const float *dout,
                                const float *inp, const float *weight, const float *mean,
                                const float *rstd, int N, int C) {
    #pragma omp parallel for schedule(static) PAR_IF(N, C)
    for (int i = 0; i < N; i++) {
        const float *x = inp + (size_t)i * C, *dy = dout + (size_t)i * C;
        const float *skip = dskip ? dskip + (size_t)i * C : NULL;
        float *dx = dinp + (size_t)i * C;
        float m = mean ? mean[i] : 0.0f, s = rstd[i], gmean = 0.0f, gxmean = 0.0f;
        #pragma omp simd reduction(+ : gmean, gxmean)
        for (int j = 0; j < C; j++) {
            float g = dy[j] * (weight ? weight[j] : 1.0f);
            gmean += g;
            gxmean += g * (x[j] - m) * s;
        }
        gmean = mean ? gmean / C : 0.0f;
        gxmean /= C;
        #pragma omp simd
        for (int j = 0; j < C; j++) {
            float g = dy[j] * (weight ? weight[j] : 1.0f);
            float d = s * (g - gmean - (x[j] - m) * s * gxmean);
            dx[j] = skip ? skip[j] + d : d;
        }
    }
}

void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dskip,
                        const float *dout, const float *inp, const float *weight,
                        const float *mean, const float *rstd, int N, int C) {
    norm_input_backward(dinp, dskip, dout, inp, weight, mean, rstd, N, C);
    gain_backward(dweight, dbias, dout, inp, mean, rstd, N, C);
}

void rmsnorm_backward(float *dinp, float *dweight, const float *dskip, const float *dout,
                      const float *inp, const float *weight, const float *rstd, int N, int C) {
    norm_input_backward(dinp, dskip, dout, inp, weight, NULL, rstd, N, C);
    gain_backward(dweight, NULL, dout, inp, NULL, rstd, N, C);
}
