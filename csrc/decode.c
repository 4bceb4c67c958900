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

/* y (OC) = x (C) @ W (C,OC) from W's panels, panels shared among the team
 * (each thread always gets the same ones, so they stay in its cache); with
 * relu, max(y, 0). No barrier. */
static void matvec(float *y, const float *x, const float *panels, int C, int OC, int relu) {
    int blocks = (OC + MATVEC_BLOCK - 1) / MATVEC_BLOCK;
    #pragma omp for schedule(static) nowait
    for (int b = 0; b < blocks; b++) {
        matvec_panels(y, x, panels, C, OC, b, b + 1);
        if (relu)
            for (int j = b * MATVEC_BLOCK; j < OC && j < (b + 1) * MATVEC_BLOCK; j++)
                y[j] = y[j] > 0.0f ? y[j] : 0.0f;
    }
}

/* x += branch, then ln = layernorm(x). */
static void residual_norm(float *x, float *ln, const float *branch, int C, float eps) {
    float mean, rstd;
    for (int c = 0; c < C; c++) x[c] += branch[c];
    layernorm_forward(ln, &mean, &rstd, x, NULL, NULL, 1, C, eps);
}

/* att (C) = causal attention of query q (C) over cached keys/values 0..pos;
 * heads shared among the team, scores in the caller's row (max_T). */
static void attend(float *att, float *scores, const float *q, const float *kc, const float *vc,
                   int pos, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
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

/* Every thread keeps its own copy of the residual stream x and its
 * layernorm, computing both redundantly (C values), so no thread waits on
 * another for them: a barrier costs more than the work. Barriers remain only
 * where a matvec's output, split among threads, feeds the next op. */
void decode_step(const DecodeModel *m, float *kcache, float *vcache, int token,
                 int pos, float *logits) {
    int C = m->C;
    /* shared rows: q, att, branch (C each), h (4C) */
    float *q = scratch(1, (size_t)7 * C), *att = q + C, *branch = att + C, *h = branch + C;
    /* one thread for models whose matrices fit in a core's cache anyway */
    #pragma omp parallel if ((long)C * C >= 128 * 128)
    {
        /* this thread's x, ln (C each) and attention scores (max_T) */
        float *x = scratch(4, (size_t)2 * C + m->max_T), *ln = x + C, *scores = ln + C;
        float mean, rstd;
        for (int c = 0; c < C; c++)
            x[c] = m->wte[(size_t)token * C + c] + m->wpe[(size_t)pos * C + c];
        layernorm_forward(ln, &mean, &rstd, x, NULL, NULL, 1, C, m->ln_eps);
        for (int l = 0; l < m->num_layers; l++) {
            float *kc = kcache + (size_t)l * m->max_T * C;
            float *vc = vcache + (size_t)l * m->max_T * C;
            matvec(q, ln, m->q[l], C, C, 0);
            matvec(kc + (size_t)pos * C, ln, m->k[l], C, C, 0);
            matvec(vc + (size_t)pos * C, ln, m->v[l], C, C, 0);
            #pragma omp barrier
            attend(att, scores, q, kc, vc, pos, C, m->NH);  /* ends in a barrier */
            matvec(branch, att, m->proj[l], C, C, 0);
            #pragma omp barrier
            residual_norm(x, ln, branch, C, m->ln_eps);
            matvec(h, ln, m->fc1[l], C, 4 * C, 1);
            #pragma omp barrier
            matvec(branch, h, m->fc2[l], 4 * C, C, 0);
            #pragma omp barrier
            residual_norm(x, ln, branch, C, m->ln_eps);  /* the last ln goes unused */
        }
        matvec(logits, x, m->head, C, m->V, 0);
    }
}
