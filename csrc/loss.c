/* Softmax cross-entropy over V classes, mean over rows whose target is not
 * ignore_index. logits and dlogits are (N,V); targets and losses are (N). */
#include <math.h>
#include "kernel.h"

/* log of the sum of exp over one row, computed stably. */
static float row_logsumexp(const float *x, int V) {
    float maxv = x[0];
    for (int j = 1; j < V; j++) maxv = x[j] > maxv ? x[j] : maxv;
    float sum = 0.0f;
    for (int j = 0; j < V; j++) sum += expf(x[j] - maxv);
    return maxv + logf(sum);
}

static int count_valid(const int *targets, int N, int ignore_index) {
    int count = 0;
    for (int i = 0; i < N; i++) count += targets[i] != ignore_index;
    return count;
}

double crossentropy_forward(float *losses, const float *logits,
                            const int *targets, int N, int V,
                            int ignore_index) {
    #pragma omp parallel for schedule(static) if ((long)N * V > 65536)
    for (int i = 0; i < N; i++) {
        const float *x = logits + (size_t)i * V;
        losses[i] = targets[i] == ignore_index
                        ? 0.0f
                        : row_logsumexp(x, V) - x[targets[i]];
    }
    /* summed in order, in double: the same loss for any thread count */
    double total = 0.0;
    for (int i = 0; i < N; i++) total += losses[i];
    int count = count_valid(targets, N, ignore_index);
    return count ? total / count : 0.0;
}

void crossentropy_backward(float *dlogits, const float *logits,
                           const int *targets, int N, int V, int ignore_index,
                           float dloss) {
    int count = count_valid(targets, N, ignore_index);
    float scale = count ? dloss / count : 0.0f;
    #pragma omp parallel for schedule(static) if ((long)N * V > 65536)
    for (int i = 0; i < N; i++) {
        const float *x = logits + (size_t)i * V;
        float *dx = dlogits + (size_t)i * V;
        if (targets[i] == ignore_index) {
            for (int j = 0; j < V; j++) dx[j] = 0.0f;
            continue;
        }
        float lse = row_logsumexp(x, V);
        for (int j = 0; j < V; j++) dx[j] = expf(x[j] - lse) * scale;
        dx[targets[i]] -= scale;
    }
}
