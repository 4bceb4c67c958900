/* Layer normalization over the last axis (C), with or without a learnable
 * gain and bias (weight, bias (C) or NULL).
 * inp, out, dinp, dout are (N,C); mean and rstd are (N), saved by forward.
 */
#include <math.h>
#include "kernel.h"

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

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int N, int C,
                       float eps) {
    #pragma omp parallel for schedule(static) if ((long)N * C > 65536)
    for (int i = 0; i < N; i++)
        rstd[i] = layernorm_row(out + (size_t)i * C, mean + i, inp + (size_t)i * C, weight, bias,
                                C, eps);
}

void layernorm_backward(float *dinp, float *dweight, float *dbias,
                        const float *dout, const float *inp,
                        const float *weight, const float *mean,
                        const float *rstd, int N, int C) {
    /* dinp = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * weight */
    #pragma omp parallel for schedule(static) if ((long)N * C > 65536)
    for (int i = 0; i < N; i++) {
        const float *x = inp + (size_t)i * C, *dy = dout + (size_t)i * C;
        float *dx = dinp + (size_t)i * C;
        float m = mean[i], s = rstd[i], gmean = 0.0f, gxmean = 0.0f;
        #pragma omp simd reduction(+ : gmean, gxmean)
        for (int j = 0; j < C; j++) {
            float g = dy[j] * (weight ? weight[j] : 1.0f);
            gmean += g;
            gxmean += g * (x[j] - m) * s;
        }
        gmean /= C;
        gxmean /= C;
        #pragma omp simd
        for (int j = 0; j < C; j++) {
            float g = dy[j] * (weight ? weight[j] : 1.0f);
            dx[j] += s * (g - gmean - (x[j] - m) * s * gxmean);
        }
    }
    if (!dweight && !dbias) return;
    /* parameter gradients sum over rows: columns split across threads, rows in order */
    #pragma omp parallel for schedule(static) if ((long)N * C > 65536)
    for (int j0 = 0; j0 < C; j0 += 16)
        for (int i = 0; i < N; i++) {
            const float *x = inp + (size_t)i * C, *dy = dout + (size_t)i * C;
            for (int j = j0; j < C && j < j0 + 16; j++) {
                if (dweight) dweight[j] += dy[j] * (x[j] - mean[i]) * rstd[i];
                if (dbias) dbias[j] += dy[j];
            }
        }
}
