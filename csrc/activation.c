/* Elementwise activations over n floats; backward writes dinp. The scalar
 * functions (gelu, silu) are kernel.h's, shared with decoding. */
#include "kernel.h"

#define PAR_IF if (n > PARALLEL_MIN)

void relu_forward(float *out, const float *inp, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
}

void relu_backward(float *dinp, const float *dout, const float *inp, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) dinp[i] = inp[i] > 0.0f ? dout[i] : 0.0f;
}

void gelu_forward(float *out, const float *inp, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) out[i] = gelu(inp[i]);
}

void gelu_backward(float *dinp, const float *dout, const float *inp, long n) {
    /* d/dx [x s(2u)] = s + x * 2 s (1 - s) * du/dx, s = sigmoid(2u) */
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) {
        float x = inp[i], s = gelu_sigmoid(x);
        float du = GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
        float slope = s + x * 2.0f * s * (1.0f - s) * du;
        dinp[i] = dout[i] * (x > GELU_TAIL ? 1.0f : x < -GELU_TAIL ? 0.0f : slope);
    }
}

void swiglu_forward(float *h, const float *gate, const float *up, long n) {
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) h[i] = silu(gate[i]) * up[i];
}

void swiglu_backward(float *dgate, float *dup, const float *dh, const float *gate,
                     const float *up, long n) {
    /* silu'(g) = s (1 + g (1 - s)), s = sigmoid(g) */
    #pragma omp parallel for simd schedule(static) PAR_IF
    for (long i = 0; i < n; i++) {
        float g = gate[i], s = sigmoid(g), d = dh[i];
        dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] = d * g * s;
    }
}
