/* Elementwise activations over n floats; backward writes dinp. */
#include <math.h>
#include "kernel.h"

#define PAR_IF if (n > 65536)

void relu_forward(float *out, const float *inp, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
}

void relu_backward(float *dinp, const float *dout, const float *inp, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) dinp[i] = inp[i] > 0.0f ? dout[i] : 0.0f;
}

/* GELU, tanh approximation (as GPT-2 uses): 0.5 x (1 + tanh(u)), written as
 * x * sigmoid(2u), which has no cancellation where tanh(u) is near -1. */
#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */

static inline float gelu_u(float x) { return GELU_K * (x + 0.044715f * x * x * x); }

void gelu_forward(float *out, const float *inp, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = x / (1.0f + expf(-2.0f * gelu_u(x)));
    }
}

void gelu_backward(float *dinp, const float *dout, const float *inp, long n) {
    /* d/dx [x s(2u)] = s + x * 2 s (1 - s) * du/dx, s = sigmoid(2u) */
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) {
        float x = inp[i];
        float s = 1.0f / (1.0f + expf(-2.0f * gelu_u(x)));
        float du = GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = dout[i] * (s + x * 2.0f * s * (1.0f - s) * du);
    }
}
