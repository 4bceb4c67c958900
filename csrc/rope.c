/* Rotary position embeddings (RoFormer; llama's q and k).
 *
 * Each head's hs values are hs/2 pairs (i, i + hs/2), the layout of
 * transformers' llama (rotate_half), so its checkpoints need no permutation.
 * Pair i of position t turns by the angle t * theta^(-2i/hs) (a scaled
 * rope stretches these frequencies):
 *   (a, b) -> (a cos - b sin, a sin + b cos).
 * Backward turns the gradient back by the same angle (a rotation's
 * transpose is its inverse). x is (B,T,heads*hs); cos and sin (T, hs/2).
 */
#include <math.h>
#include "kernel.h"

/* Pair i's frequency, theta^(-2i/hs), stretched as cfg->rope_scaling says
 * (transformers' linear and llama3 rope types): llama 3.1 divides the
 * frequencies of wavelengths longer than its original context by
 * low_freq by rope_factor, keeps those shorter than original / high_freq,
 * and blends linearly between them. */
static double frequency(const ModelConfig *cfg, int i, int hs) {
    double freq = pow((double)cfg->rope_theta, -2.0 * i / hs);
    if (cfg->rope_scaling == ROPE_SCALING_LINEAR) return freq / cfg->rope_factor;
    if (cfg->rope_scaling != ROPE_SCALING_LLAMA3) return freq;
    double wavelength = 2 * 3.14159265358979323846 / freq, original = cfg->rope_original_T;
    if (wavelength < original / cfg->rope_high_freq) return freq;
    if (wavelength > original / cfg->rope_low_freq) return freq / cfg->rope_factor;
    double smooth = (original / wavelength - cfg->rope_low_freq) /
                    (cfg->rope_high_freq - cfg->rope_low_freq);
    return (1 - smooth) * freq / cfg->rope_factor + smooth * freq;
}

/* The angles in double: t * freq reaches thousands of radians at long
 * contexts, where a float32 product would already be off by 1e-4. */
void rope_angles(float *cos_t, float *sin_t, int t, int hs, const ModelConfig *cfg) {
    for (int i = 0; i < hs / 2; i++) {
        double angle = t * frequency(cfg, i, hs);
        cos_t[i] = (float)cos(angle);
        sin_t[i] = (float)sin(angle);
    }
}

void rope_table(float *cos_t, float *sin_t, int T, int hs, const ModelConfig *cfg) {
    for (int t = 0; t < T; t++)
        rope_angles(cos_t + (size_t)t * (hs / 2), sin_t + (size_t)t * (hs / 2), t, hs, cfg);
}

void rope_row(float *x, const float *cos_t, const float *sin_t, int heads, int hs, float sign) {
    int half = hs / 2;
    for (int h = 0; h < heads; h++) {
        float *a = x + (size_t)h * hs, *b = a + half;
        #pragma omp simd
        for (int i = 0; i < half; i++) {
            float c = cos_t[i], s = sign * sin_t[i], ai = a[i], bi = b[i];
            a[i] = ai * c - bi * s;
            b[i] = ai * s + bi * c;
        }
    }
}

static void rotate(float *x, const float *cos_t, const float *sin_t, int B, int T, int heads,
                   int hs, float sign) {
    size_t row = (size_t)heads * hs, half = hs / 2;
    #pragma omp parallel for collapse(2) schedule(static) if ((long)B * T * row > PARALLEL_MIN)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            rope_row(x + ((size_t)b * T + t) * row, cos_t + t * half, sin_t + t * half, heads,
                     hs, sign);
}

void rope_forward(float *x, const float *cos_t, const float *sin_t, int B, int T, int heads,
                  int hs) {
    rotate(x, cos_t, sin_t, B, T, heads, hs, 1.0f);
}

void rope_backward(float *dx, const float *cos_t, const float *sin_t, int B, int T, int heads,
                   int hs) {
    rotate(dx, cos_t, sin_t, B, T, heads, hs, -1.0f);
}
