/* The whole model: one forward and its literal mirror backward, for every
 * architecture a ModelConfig describes (the lua, gpt2 and llama presets and
 * any mix of their parts), as a straight line of op calls per block.
 *
 * Block (pre-norm), with each sublayer's output dropped out in training:
 *   xmid = x + dropout(attention(norm1(x)) @ proj + proj_b)
 *   out  = xmid + dropout(mlp(norm2(xmid)) @ fc2 + fc2_b)
 * then an optional final norm, and the head (or wte transposed, tied).
 * Shapes are in sqlgpt.h; the decode step (decode.c) runs the same blocks
 * one token at a time with the same per-row helpers.
 */
#include <stddef.h>
#include "kernel.h"

static int head_size(const ModelConfig *cfg) { return cfg->C / cfg->NH; }
static int kv_width(const ModelConfig *cfg) { return cfg->KVH * head_size(cfg); }

static void norm_forward(const ModelConfig *cfg, float *out, float *mean, float *rstd,
                         const float *x, const float *weight, const float *bias, int N) {
    if (cfg->norm == NORM_RMSNORM) rmsnorm_forward(out, rstd, x, weight, N, cfg->C, cfg->norm_eps);
    else layernorm_forward(out, mean, rstd, x, weight, bias, N, cfg->C, cfg->norm_eps);
}

/* dinp = dskip + the gradient through the norm (see sqlgpt.h) */
static void norm_backward(const ModelConfig *cfg, float *dinp, float *dweight, float *dbias,
                          const float *dskip, const float *dout, const float *x,
                          const float *weight, const float *mean, const float *rstd, int N) {
    if (cfg->norm == NORM_RMSNORM)
        rmsnorm_backward(dinp, dweight, dskip, dout, x, weight, rstd, N, cfg->C);
    else layernorm_backward(dinp, dweight, dbias, dskip, dout, x, weight, mean, rstd, N, cfg->C);
}

/* out = x + dropout(branch); seed NULL is evaluation (no dropout). */
static void residual_forward(float *out, const float *x, const float *branch, long n, float p,
                             const unsigned long long *seed) {
    residual_dropout_forward(out, x, branch, n, seed ? p : 0.0f, seed ? *seed : 0);
}

/* The gradient of a sublayer's output, through its dropout: dout itself
 * in evaluation mode, else the masked copy in scratch. */
static const float *branch_backward(float *scratch_buf, const float *dout, long n, float p,
                                    const unsigned long long *seed) {
    if (!seed || p <= 0.0f) return dout;
    dropout_backward(scratch_buf, dout, n, p, *seed);
    return scratch_buf;
}

/* l->h (N,F) = the activation of norm2's output through fc1 (and gate). */
static int mlp_forward(const ModelConfig *cfg, const LayerTensors *w, const LayerActs *l, int N) {
    int C = cfg->C, F = cfg->F, st = 0;
    switch (cfg->mlp) {
    case MLP_RELU: /* fused: h = max(ln2 @ fc1 + b, 0), no pre-activation kept */
        return matmul_relu_forward(l->h, l->ln2, w->fc1, w->fc1_b, N, C, F);
    case MLP_GELU:
        st |= matmul_forward(l->pre, l->ln2, w->fc1, w->fc1_b, N, C, F);
        gelu_forward(l->h, l->pre, (long)N * F);
        return st;
    default: /* MLP_SWIGLU: h = silu(ln2 @ gate) * (ln2 @ fc1) */
        st |= matmul_forward(l->gate, l->ln2, w->gate, w->gate_b, N, C, F);
        st |= matmul_forward(l->pre, l->ln2, w->fc1, w->fc1_b, N, C, F);
        swiglu_forward(l->h, l->gate, l->pre, (long)N * F);
        return st;
    }
}

/* Mirror of mlp_forward: a->dh holds dL/dh; adds norm2's output gradient
 * into a->dln (written, then accumulated over gate). */
static int mlp_backward(const ModelConfig *cfg, const LayerTensors *w, const LayerTensors *g,
                        const LayerActs *l, const ModelActs *a, int N) {
    int C = cfg->C, F = cfg->F, st = 0;
    long n = (long)N * F;
    switch (cfg->mlp) {
    case MLP_RELU: /* h > 0 exactly where fc1's output is: relu's mask without keeping it */
        relu_backward(a->dh, a->dh, l->h, n);
        return matmul_backward(a->dln, g->fc1, g->fc1_b, a->dh, l->ln2, w->fc1, N, C, F, 0);
    case MLP_GELU:
        gelu_backward(a->dh, a->dh, l->pre, n);
        return matmul_backward(a->dln, g->fc1, g->fc1_b, a->dh, l->ln2, w->fc1, N, C, F, 0);
    default: /* MLP_SWIGLU */
        swiglu_backward(a->dgate, a->dh, a->dh, l->gate, l->pre, n);
        st |= matmul_backward(a->dln, g->fc1, g->fc1_b, a->dh, l->ln2, w->fc1, N, C, F, 0);
        st |= matmul_backward(a->dln, g->gate, g->gate_b, a->dgate, l->ln2, w->gate, N, C, F, 1);
        return st;
    }
}

/* One block: l->x -> out. seeds: this block's two dropout seeds, or NULL. */
static int block_forward(const ModelConfig *cfg, const LayerTensors *w, const LayerActs *l,
                         const ModelActs *a, float *out, int B, int T, float p,
                         const unsigned long long *seeds) {
    int N = B * T, C = cfg->C, KVC = kv_width(cfg), hs = head_size(cfg), st = 0;
    /* attention sublayer */
    norm_forward(cfg, l->ln1, l->mean1, l->rstd1, l->x, w->ln1_w, w->ln1_b, N);
    st |= matmul_forward(l->q, l->ln1, w->q, w->q_b, N, C, C);
    st |= matmul_forward(l->k, l->ln1, w->k, w->k_b, N, C, KVC);
    st |= matmul_forward(l->v, l->ln1, w->v, w->v_b, N, C, KVC);
    if (cfg->pos == POS_ROPE) {
        rope_forward(l->q, a->rope_cos, a->rope_sin, B, T, cfg->NH, hs);
        rope_forward(l->k, a->rope_cos, a->rope_sin, B, T, cfg->KVH, hs);
    }
    st |= attention_forward(l->att, l->lse, l->q, l->k, l->v, B, T, cfg->NH, cfg->KVH, hs);
    st |= matmul_forward(a->branch, l->att, w->proj, w->proj_b, N, C, C);
    residual_forward(l->xmid, l->x, a->branch, (long)N * C, p, seeds);
    /* MLP sublayer */
    norm_forward(cfg, l->ln2, l->mean2, l->rstd2, l->xmid, w->ln2_w, w->ln2_b, N);
    st |= mlp_forward(cfg, w, l, N);
    st |= matmul_forward(a->branch, l->h, w->fc2, w->fc2_b, N, cfg->F, C);
    residual_forward(out, l->xmid, a->branch, (long)N * C, p, seeds ? seeds + 1 : NULL);
    return st;
}

/* Mirror of block_forward: a->dx holds dL/d(out) and becomes dL/d(l->x). */
static int block_backward(const ModelConfig *cfg, const LayerTensors *w, const LayerTensors *g,
                          const LayerActs *l, const ModelActs *a, int B, int T, float p,
                          const unsigned long long *seeds) {
    int N = B * T, C = cfg->C, KVC = kv_width(cfg), hs = head_size(cfg), st = 0;
    long n = (long)N * C;
    /* MLP sublayer */
    const float *dbranch = branch_backward(a->dbranch, a->dx, n, p, seeds ? seeds + 1 : NULL);
    st |= matmul_backward(a->dh, g->fc2, g->fc2_b, dbranch, l->h, w->fc2, N, cfg->F, C, 0);
    st |= mlp_backward(cfg, w, g, l, a, N);
    norm_backward(cfg, a->dx, g->ln2_w, g->ln2_b, a->dx, a->dln, l->xmid, w->ln2_w, l->mean2,
                  l->rstd2, N);
    /* attention sublayer (a->dx is now dL/d(xmid)) */
    dbranch = branch_backward(a->dbranch, a->dx, n, p, seeds);
    st |= matmul_backward(a->datt, g->proj, g->proj_b, dbranch, l->att, w->proj, N, C, C, 0);
    st |= attention_backward(a->dq, a->dk, a->dv, a->datt, l->q, l->k, l->v, l->att, l->lse,
                             B, T, cfg->NH, cfg->KVH, hs);
    if (cfg->pos == POS_ROPE) {
        rope_backward(a->dq, a->rope_cos, a->rope_sin, B, T, cfg->NH, hs);
        rope_backward(a->dk, a->rope_cos, a->rope_sin, B, T, cfg->KVH, hs);
    }
    /* norm1's output feeds q, k and v: its gradient is the sum of three */
    st |= matmul_backward(a->dln, g->q, g->q_b, a->dq, l->ln1, w->q, N, C, C, 0);
    st |= matmul_backward(a->dln, g->k, g->k_b, a->dk, l->ln1, w->k, N, C, KVC, 1);
    st |= matmul_backward(a->dln, g->v, g->v_b, a->dv, l->ln1, w->v, N, C, KVC, 1);
    norm_backward(cfg, a->dx, g->ln1_w, g->ln1_b, a->dx, a->dln, l->x, w->ln1_w, l->mean1,
                  l->rstd1, N);
    return st;
}

/* The head's input: the final norm's output, or the last block's. */
static const float *head_input(const ModelConfig *cfg, const ModelActs *a) {
    return cfg->final_norm ? a->lnf : a->x_final;
}

int model_forward(const ModelConfig *cfg, const ModelTensors *w, const ModelActs *a,
                  const int *ids, const int *targets, int B, int T, float dropout,
                  const unsigned long long *seeds, int ignore_index, double *loss) {
    int N = B * T, C = cfg->C, st = 0;
    if (cfg->pos == POS_ROPE) rope_table(a->rope_cos, a->rope_sin, T, head_size(cfg),
                                         cfg->rope_theta);
    embedding_forward(a->layers[0].x, ids, w->wte, w->wpe, B, T, C);
    for (int l = 0; l < cfg->num_layers; l++) {
        float *out = l + 1 < cfg->num_layers ? a->layers[l + 1].x : a->x_final;
        st |= block_forward(cfg, &w->layers[l], &a->layers[l], a, out, B, T, dropout,
                            seeds ? seeds + 2 * l : NULL);
    }
    if (cfg->final_norm)
        norm_forward(cfg, a->lnf, a->meanf, a->rstdf, a->x_final, w->lnf_w, w->lnf_b, N);
    st |= w->head ? matmul_forward(a->logits, head_input(cfg, a), w->head, NULL, N, C, cfg->V)
                  : matmul_t_forward(a->logits, head_input(cfg, a), w->wte, N, C, cfg->V);
    if (targets)
        st |= crossentropy_forward(loss, a->losses, a->logits, targets, N, cfg->V, ignore_index);
    return st;
}

int model_backward(const ModelConfig *cfg, const ModelTensors *w, const ModelTensors *grads,
                   const ModelActs *a, const int *ids, const int *targets, int B, int T,
                   float dropout, const unsigned long long *seeds, int ignore_index) {
    int N = B * T, C = cfg->C, V = cfg->V, st = 0;
    /* dlogits overwrite the logits in place: each row is read before it is written */
    crossentropy_backward(a->logits, a->logits, targets, N, V, ignore_index, 1.0f);
    float *dhead_in = cfg->final_norm ? a->dln : a->dx;
    st |= w->head ? matmul_backward(dhead_in, grads->head, NULL, a->logits, head_input(cfg, a),
                                    w->head, N, C, V, 0)
                  : matmul_t_backward(dhead_in, grads->wte, a->logits, head_input(cfg, a),
                                      w->wte, N, C, V);
    if (cfg->final_norm)
        norm_backward(cfg, a->dx, grads->lnf_w, grads->lnf_b, NULL, a->dln, a->x_final,
                      w->lnf_w, a->meanf, a->rstdf, N);
    for (int l = cfg->num_layers - 1; l >= 0; l--) {
        const unsigned long long *block_seeds = seeds ? seeds + 2 * l : NULL;
        /* the last block's activations are still in the shared buffers; the
         * recomputed output equals what the next block's x already holds */
        if (a->recompute && l + 1 < cfg->num_layers)
            st |= block_forward(cfg, &w->layers[l], &a->layers[l], a, a->layers[l + 1].x, B, T,
                                dropout, block_seeds);
        st |= block_backward(cfg, &w->layers[l], &grads->layers[l], &a->layers[l], a, B, T,
                             dropout, block_seeds);
    }
    embedding_backward(grads->wte, grads->wpe, a->dx, ids, B, T, C);
    return st;
}
