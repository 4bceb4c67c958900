/* Adam / AdamW over a flat run of parameters with their grad, m and v buffers
 * (the original's four buffers per tensor), plus gradient-norm helpers. */
#include <math.h>
#include <string.h>
#include "kernel.h"

void adamw_update(float *data, const float *grad, float *m, float *v, long n,
                  double lr, double beta1, double beta2, double eps,
                  double weight_decay, int decoupled, int step) {
    float b1 = (float)beta1, b2 = (float)beta2, one_b1 = (float)(1.0 - beta1),
          one_b2 = (float)(1.0 - beta2), flr = (float)lr, feps = (float)eps,
          wd = (float)weight_decay;
    float c1 = (float)(1.0 - pow(beta1, step)), c2 = (float)(1.0 - pow(beta2, step));
    if (!decoupled) { /* Adam with L2: the decay joins the gradient (torch.optim.Adam) */
        #pragma omp parallel for simd schedule(static) if (n > PARALLEL_MIN)
        for (long i = 0; i < n; i++) {
            float g = grad[i] + wd * data[i];
            m[i] = b1 * m[i] + one_b1 * g;
            v[i] = b2 * v[i] + one_b2 * g * g;
            data[i] -= flr * ((m[i] / c1) / (sqrtf(v[i] / c2) + feps));
        }
        return;
    }
    #pragma omp parallel for simd schedule(static) if (n > PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        float g = grad[i];
        m[i] = b1 * m[i] + one_b1 * g;
        v[i] = b2 * v[i] + one_b2 * g * g;
        float mhat = m[i] / c1, vhat = v[i] / c2;
        data[i] -= flr * (mhat / (sqrtf(vhat) + feps) + wd * data[i]);
    }
}

void sgd_update(float *data, const float *grad, float *momentum_buf, long n, double lr,
                double momentum, double weight_decay) {
    float flr = (float)lr, mu = (float)momentum, wd = (float)weight_decay;
    /* torch.optim.SGD: d = g + wd p; buf = mu buf + d (buf starts at 0, so
     * the first step's buf is d, as torch's clone); p -= lr buf */
    #pragma omp parallel for simd schedule(static) if (n > PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        float d = grad[i] + wd * data[i];
        float step = mu > 0.0f ? (momentum_buf[i] = mu * momentum_buf[i] + d) : d;
        data[i] -= flr * step;
    }
}

double sum_squares(const float *x, long n) {
    /* fixed blocks summed in order: the same result for any thread count */
    enum { BLOCK = 4096 };
    long nblocks = (n + BLOCK - 1) / BLOCK;
    double total = 0.0;
    #pragma omp parallel for ordered schedule(static) if (n > PARALLEL_MIN)
    for (long b = 0; b < nblocks; b++) {
        double s = 0.0;
        long end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        for (long i = b * BLOCK; i < end; i++) s += (double)x[i] * x[i];
        #pragma omp ordered
        total += s;
    }
    return total;
}

/* x[0:n] = 0 on every core: the backward pass clears tens of MB of
 * activation gradients per layer, and one thread's memset left the other
 * core idle. */
void zero_floats(float *x, long n) {
    enum { CHUNK = 16384 };
    #pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
    for (long i = 0; i < n; i += CHUNK)
        memset(x + i, 0, sizeof(float) * (n - i < CHUNK ? n - i : CHUNK));
}

void scale_inplace(float *x, long n, float factor) {
    #pragma omp parallel for simd schedule(static) if (n > PARALLEL_MIN)
    for (long i = 0; i < n; i++) x[i] *= factor;
}
