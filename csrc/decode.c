/* Generation: one token through every layer with a KV cache, in one call,
 * so a token costs no Python round trips and no allocation.
 *
 * The same math as the training forward in eval mode (parameter-free
 * layernorm, causal attention, ReLU MLP, no dropout), one row at a time:
 * x (C) is the residual stream of the new token at position pos; its keys and
 * values are appended to the cache and attention reads positions 0..pos.
 */
#include <math.h>
#include <string.h>
#include "kernel.h"

#define LN_EPS 1e-5f

/* y (OC) = x (C) @ W (C,OC): the training matmul with one row. */
static void matvec(float *y, const float *x, const float *w, int C, int OC) {
    matmul_forward(y, x, w, NULL, 1, C, OC);
}

static void layernorm_row(float *out, const float *x, int C) {
    float mean, rstd;
    layernorm_forward(out, &mean, &rstd, x, NULL, NULL, 1, C, LN_EPS);
}

/* att (C) = causal attention of query q (C) over cached keys/values 0..pos. */
static void attend(float *att, float *scores, const float *q, const float *kc,
                   const float *vc, int pos, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    for (int h = 0; h < NH; h++) {
        const float *qh = q + h * hs;
        float maxv = -INFINITY;
        for (int s = 0; s <= pos; s++) {
            const float *ks = kc + (size_t)s * C + h * hs;
            float dot = 0.0f;
            #pragma omp simd reduction(+ : dot)
            for (int d = 0; d < hs; d++) dot += qh[d] * ks[d];
            scores[s] = dot * scale;
            maxv = scores[s] > maxv ? scores[s] : maxv;
        }
        float sum = 0.0f;
        #pragma omp simd reduction(+ : sum)
        for (int s = 0; s <= pos; s++) {
            scores[s] = fast_expf(scores[s] - maxv);
            sum += scores[s];
        }
        float *ah = att + h * hs;
        memset(ah, 0, sizeof(float) * hs);
        for (int s = 0; s <= pos; s++) {
            const float *vs = vc + (size_t)s * C + h * hs;
            float p = scores[s] / sum;
            #pragma omp simd
            for (int d = 0; d < hs; d++) ah[d] += p * vs[d];
        }
    }
}

void decode_step(const DecodeModel *m, float *kcache, float *vcache, int token,
                 int pos, float *logits) {
    int C = m->C;
    /* work rows: x, ln, q, att, branch (C each), h (4C), scores (max_T) */
    float *x = scratch(1, (size_t)9 * C + m->max_T);
    float *ln = x + C, *q = ln + C, *att = q + C, *branch = att + C, *h = branch + C;
    float *scores = h + 4 * C;
    for (int c = 0; c < C; c++)
        x[c] = m->wte[(size_t)token * C + c] + m->wpe[(size_t)pos * C + c];
    for (int l = 0; l < m->num_layers; l++) {
        float *kc = kcache + (size_t)l * m->max_T * C, *vc = vcache + (size_t)l * m->max_T * C;
        layernorm_row(ln, x, C);
        matvec(q, ln, m->q[l], C, C);
        matvec(kc + (size_t)pos * C, ln, m->k[l], C, C);
        matvec(vc + (size_t)pos * C, ln, m->v[l], C, C);
        attend(att, scores, q, kc, vc, pos, C, m->NH);
        matvec(branch, att, m->proj[l], C, C);
        for (int c = 0; c < C; c++) x[c] += branch[c];
        layernorm_row(ln, x, C);
        matvec(h, ln, m->fc1[l], C, 4 * C);
        for (int j = 0; j < 4 * C; j++) h[j] = h[j] > 0.0f ? h[j] : 0.0f;
        matvec(branch, h, m->fc2[l], 4 * C, C);
        for (int c = 0; c < C; c++) x[c] += branch[c];
    }
    matvec(logits, x, m->head, C, m->V);
}
