/* Generation: one token through every layer with a KV cache, in one call,
 * so a token costs no Python round trips and no allocation.
 *
 * The same math as the training forward in eval mode (parameter-free
 * layernorm, causal attention, ReLU MLP, no dropout), one row at a time:
 * x (C) is the residual stream of the new token at position pos; its keys and
 * values are appended to the cache and attention reads positions 0..pos.
 *
 * A token reads every weight once, so decoding is bound by memory bandwidth:
 * both cores stream halves of each matrix. One parallel region spans the
 * whole step (a region per matvec would cost more than the matvec), with a
 * barrier wherever a result feeds the next op.
 */
#include <math.h>
#include <string.h>
#include "kernel.h"

/* y (OC) = x (C) @ W (C,OC), column blocks shared among the team; no barrier. */
static void matvec(float *y, const float *x, const float *w, int C, int OC) {
    int blocks = (OC + MATVEC_BLOCK - 1) / MATVEC_BLOCK;
    #pragma omp for schedule(static) nowait
    for (int b = 0; b < blocks; b++) {
        int j0 = b * MATVEC_BLOCK, j1 = j0 + MATVEC_BLOCK < OC ? j0 + MATVEC_BLOCK : OC;
        matvec_columns(y, x, w, C, OC, j0, j1);
    }
}

static void layernorm_row(float *out, const float *x, int C, float eps) {
    float mean, rstd;
    layernorm_forward(out, &mean, &rstd, x, NULL, NULL, 1, C, eps);
}

/* att (C) = causal attention of query q (C) over cached keys/values 0..pos;
 * heads shared among the team, each thread with its own score row. */
static void attend(float *att, const float *q, const float *kc, const float *vc, int pos,
                   int C, int NH, int max_T) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    float *scores = scratch(4, (size_t)max_T);
    #pragma omp for schedule(static)
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
    /* shared work rows: x, ln, q, att, branch (C each), h (4C) */
    float *x = scratch(1, (size_t)9 * C);
    float *ln = x + C, *q = ln + C, *att = q + C, *branch = att + C, *h = branch + C;
    for (int c = 0; c < C; c++)
        x[c] = m->wte[(size_t)token * C + c] + m->wpe[(size_t)pos * C + c];
    layernorm_row(ln, x, C, m->ln_eps);
    /* one thread for models whose matrices fit in a core's cache anyway */
    #pragma omp parallel if ((long)C * C >= 128 * 128)
    for (int l = 0; l < m->num_layers; l++) {
        float *kc = kcache + (size_t)l * m->max_T * C, *vc = vcache + (size_t)l * m->max_T * C;
        matvec(q, ln, m->q[l], C, C);
        matvec(kc + (size_t)pos * C, ln, m->k[l], C, C);
        matvec(vc + (size_t)pos * C, ln, m->v[l], C, C);
        #pragma omp barrier
        attend(att, q, kc, vc, pos, C, m->NH, m->max_T);  /* ends in a barrier */
        matvec(branch, att, m->proj[l], C, C);
        #pragma omp barrier
        #pragma omp single
        {
            for (int c = 0; c < C; c++) x[c] += branch[c];
            layernorm_row(ln, x, C, m->ln_eps);
        }
        matvec(h, ln, m->fc1[l], C, 4 * C);
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int j = 0; j < 4 * C; j++) h[j] = h[j] > 0.0f ? h[j] : 0.0f;
        matvec(branch, h, m->fc2[l], 4 * C, C);
        #pragma omp barrier
        #pragma omp single
        {
            for (int c = 0; c < C; c++) x[c] += branch[c];
            if (l + 1 < m->num_layers) layernorm_row(ln, x, C, m->ln_eps);
        }
    }
    matvec_columns(logits, x, m->head, C, m->V, 0, m->V);
}
