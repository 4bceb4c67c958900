/* A classification head on the final hidden states: each sequence pooled
 * into one row (its last position's state, or the mean over its
 * positions), then logits = pooled @ W + b and softmax cross-entropy against
 * the labels (loss.c). Sequences are padded on the right to T; lens gives
 * each one's real length, so causal attention never lets the padding reach
 * a pooled position. */
#include <string.h>
#include "kernel.h"

void pool_forward(float *pooled, const float *h, const int *lens, int B, int T, int C, int pool) {
    for (int b = 0; b < B; b++) {
        const float *seq = h + (size_t)b * T * C;
        float *out = pooled + (size_t)b * C;
        int n = lens[b] < 1 ? 1 : lens[b] > T ? T : lens[b];
        if (pool == POOL_LAST) {
            memcpy(out, seq + (size_t)(n - 1) * C, sizeof(float) * C);
            continue;
        }
        /* the mean in order over positions, in double: the same for any n */
        for (int c = 0; c < C; c++) {
            double sum = 0.0;
            for (int t = 0; t < n; t++) sum += seq[(size_t)t * C + c];
            out[c] = (float)(sum / n);
        }
    }
}

void pool_backward(float *dh, const float *dpooled, const int *lens, int B, int T, int C,
                   int pool) {
    memset(dh, 0, sizeof(float) * (size_t)B * T * C);
    for (int b = 0; b < B; b++) {
        float *seq = dh + (size_t)b * T * C;
        const float *d = dpooled + (size_t)b * C;
        int n = lens[b] < 1 ? 1 : lens[b] > T ? T : lens[b];
        if (pool == POOL_LAST) {
            memcpy(seq + (size_t)(n - 1) * C, d, sizeof(float) * C);
            continue;
        }
        for (int t = 0; t < n; t++)
            for (int c = 0; c < C; c++) seq[(size_t)t * C + c] = d[c] / (float)n;
    }
}

int classify_forward(float *logits, double *loss, float *losses, const float *pooled,
                     const float *W, const float *bias, const int *labels, int B, int C, int L,
                     int ignore_index) {
    int st = matmul_forward(logits, pooled, W, bias, B, C, L);
    if (labels) st |= crossentropy_forward(loss, losses, logits, labels, B, L, ignore_index);
    return st;
}

int classify_backward(float *dpooled, float *dW, float *dbias, float *logits,
                      const float *pooled, const float *W, const int *labels, int B, int C,
                      int L, int ignore_index) {
    /* the logits become their gradient in place, as the model's do */
    crossentropy_backward(logits, logits, labels, B, L, ignore_index, 1.0f);
    return matmul_backward(dpooled, dW, dbias, logits, pooled, W, B, C, L, 0);
}
