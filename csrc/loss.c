/* Softmax cross-entropy over V classes, mean over rows whose target is not
 * ignore_index. logits and dlogits are (N,V); targets and losses are (N).
 * dlogits may be the logits buffer itself: each row is read before it is written. */
#include <math.h>
#include "kernel.h"

static inline float row_max(const float *x, int V) {
    float maxv = x[0];
    #pragma omp simd reduction(max : maxv)
    for (int j = 1; j < V; j++) maxv = x[j] > maxv ? x[j] : maxv;
    return maxv;
}

/* One row's loss, log(sum_j exp(x_j - x_t)), summed in double: a confident
 * correct prediction has a loss far below float32's resolution of the
 * logits (the sum is 1 + tiny). Each term is a float exp, which is exact to
 * about an ulp and vectorizes. */
static double row_loss(const float *x, int V, int target) {
    float maxv = row_max(x, V);
    double sum = 0.0;
    #pragma omp simd reduction(+ : sum)
    for (int j = 0; j < V; j++) sum += (double)fast_expf(x[j] - maxv);
    return log(sum) - ((double)x[target] - maxv);
}

static int count_valid(const int *targets, int N, int ignore_index) {
    int count = 0;
    for (int i = 0; i < N; i++) count += targets[i] != ignore_index;
    return count;
}

int crossentropy_forward(double *loss, float *losses, const float *logits,
                         const int *targets, int N, int V, int ignore_index) {
    double *row = (double *)scratch(SCRATCH_LOSS_ROWS, 2 * (size_t)N); /* per-row losses in double */
    if (!row) return take_status();
    #pragma omp parallel for schedule(static) if ((long)N * V > PARALLEL_MIN)
    for (int i = 0; i < N; i++) {
        row[i] = targets[i] == ignore_index ? 0.0
                                            : row_loss(logits + (size_t)i * V, V, targets[i]);
        losses[i] = (float)row[i];
    }
    /* summed in order: the same loss for any thread count */
    double total = 0.0;
    for (int i = 0; i < N; i++) total += row[i];
    int count = count_valid(targets, N, ignore_index);
    *loss = count ? total / count : 0.0;
    return take_status();
}

void crossentropy_backward(float *dlogits, const float *logits,
                           const int *targets, int N, int V, int ignore_index,
                           float dloss) {
    int count = count_valid(targets, N, ignore_index);
    float scale = count ? dloss / count : 0.0f;
    #pragma omp parallel for schedule(static) if ((long)N * V > PARALLEL_MIN)
    for (int i = 0; i < N; i++) {
        const float *x = logits + (size_t)i * V;
        float *dx = dlogits + (size_t)i * V;
        int t = targets[i];
        if (t == ignore_index) {
            for (int j = 0; j < V; j++) dx[j] = 0.0f;
            continue;
        }
        float maxv = row_max(x, V), sum = 0.0f, others = 0.0f;
        #pragma omp simd reduction(+ : sum)
        for (int j = 0; j < V; j++) {
            dx[j] = fast_expf(x[j] - maxv);
            sum += dx[j];
        }
        /* the target's p - 1 is -(sum of the other classes)/sum: no
         * cancellation when p is near 1 */
        for (int j = 0; j < V; j++) others += j == t ? 0.0f : dx[j];
        float inv = scale / sum;
        for (int j = 0; j < V; j++) dx[j] *= inv;
        dx[t] = -others * inv;
    }
}
