/* Elementwise activations over n floats; backward accumulates into dinp. */
#include <math.h>
#include "kernel.h"

#define PAR_IF if (n > 65536)

void relu_forward(float *out, const float *inp, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
}

void relu_backward(float *dinp, const float *dout, const float *inp, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) dinp[i] += inp[i] > 0.0f ? dout[i] : 0.0f;
}

/* GELU, tanh approximation (as GPT-2 uses). */
#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */

void gelu_forward(float *out, const float *inp, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_K * (x + 0.044715f * x * x * x)));
    }
}

void gelu_backward(float *dinp, const float *dout, const float *inp, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) {
        float x = inp[i];
        float u = GELU_K * (x + 0.044715f * x * x * x);
        float th = tanhf(u);
        float sech2 = 1.0f - th * th;
        float du = GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] += dout[i] * (0.5f * (1.0f + th) + 0.5f * x * sech2 * du);
    }
}
