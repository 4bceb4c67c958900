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

/* LoRA's sites, in the order of Lora.seeds, and their LayerTensors fields */
enum { SITE_Q, SITE_K, SITE_V, SITE_PROJ, SITE_GATE, SITE_FC1, SITE_FC2 };
static const size_t SITE_FIELD[LORA_SITES] = {
    offsetof(LayerTensors, q), offsetof(LayerTensors, k), offsetof(LayerTensors, v),
    offsetof(LayerTensors, proj), offsetof(LayerTensors, gate), offsetof(LayerTensors, fc1),
    offsetof(LayerTensors, fc2)};

static int head_size(const ModelConfig *cfg) { return cfg->HS; }
static int q_width(const ModelConfig *cfg) { return cfg->NH * cfg->HS; }
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

/* One block's place in the model, as its linears need it: the adapters and
 * the layer they read. */
typedef struct { const Lora *lora; int l; } Adapted;

/* The matrix field of site in layer set (a, b, da, db or u), or NULL. */
static float *site_field(const LayerTensors *set, int l, int site) {
    return set ? *(float *const *)((const char *)&set[l] + SITE_FIELD[site]) : NULL;
}

/* The site's input as A sees it: x itself, or x dropped out (into xdrop,
 * the same mask in backward as in forward: it is a hash of the seed). */
static const float *lora_input(Adapted ad, int site, const float *x, long n) {
    const Lora *lo = ad.lora;
    if (!lo->seeds || lo->dropout <= 0.0f) return x;
    dropout_forward(lo->xdrop, x, n, lo->dropout, lo->seeds[ad.l * LORA_SITES + site]);
    return lo->xdrop;
}

/* y (N,out) += scale * u @ B, u = drop(x) @ A (N,rank) kept for backward. */
static int lora_forward(float *y, const float *x, Adapted ad, int site, int N, int in,
                        int out) {
    const Lora *lo = ad.lora;
    const float *A = lo ? site_field(lo->a, ad.l, site) : NULL;
    if (!A) return SQLGPT_OK;
    int r = lo->rank;
    float *u = site_field(lo->u, ad.l, site);
    int st = matmul_forward(u, lora_input(ad, site, x, (long)N * in), A, NULL, N, in, r);
    for (long i = 0; i < (long)N * r; i++) lo->tmp[i] = lo->scale * u[i];
    gemm(y, (Strided){lo->tmp, r, 1}, (Strided){site_field(lo->b, ad.l, site), out, 1}, N,
         out, r, 0);
    return st | take_status();
}

/* Mirror of lora_forward, dy (N,out) given: dB += scale u^T dy; du = scale
 * dy B^T; dA += drop(x)^T du; dx += drop'(du A^T) (dx already holds the
 * base's gradient). */
static int lora_backward(float *dx, const float *dy, const float *x, Adapted ad, int site,
                         int N, int in, int out) {
    const Lora *lo = ad.lora;
    const float *A = lo ? site_field(lo->a, ad.l, site) : NULL;
    if (!A) return SQLGPT_OK;
    int r = lo->rank;
    const float *u = site_field(lo->u, ad.l, site), *B = site_field(lo->b, ad.l, site);
    long nr = (long)N * r, nx = (long)N * in;
    for (long i = 0; i < nr; i++) lo->tmp[i] = lo->scale * u[i];
    gemm(site_field(lo->db, ad.l, site), (Strided){lo->tmp, 1, r}, (Strided){dy, out, 1}, r,
         out, N, 0);
    gemm(lo->tmp, (Strided){dy, out, 1}, (Strided){B, 1, out}, N, r, out, GEMM_OVERWRITE);
    for (long i = 0; i < nr; i++) lo->tmp[i] *= lo->scale;
    const float *xin = lora_input(ad, site, x, nx);
    gemm(site_field(lo->da, ad.l, site), (Strided){xin, 1, in}, (Strided){lo->tmp, r, 1}, in, r,
         N, 0);
    if (xin == x) { /* no dropout: straight into dx */
        gemm(dx, (Strided){lo->tmp, r, 1}, (Strided){A, 1, r}, N, in, r, 0);
        return take_status();
    }
    gemm(lo->xdrop, (Strided){lo->tmp, r, 1}, (Strided){A, 1, r}, N, in, r, GEMM_OVERWRITE);
    residual_dropout_forward(dx, dx, lo->xdrop, nx, lo->dropout,
                             lo->seeds[ad.l * LORA_SITES + site]); /* dx += mask * it */
    return take_status();
}

/* y (N,out) = x @ W + b, plus the site's adapter where it has one. */
static int linear_forward(float *y, const float *x, const float *W, const float *b, Adapted ad,
                          int site, int N, int in, int out) {
    return matmul_forward(y, x, W, b, N, in, out) | lora_forward(y, x, ad, site, N, in, out);
}

/* Mirror of linear_forward: dx (=, or += with accumulate) and the
 * gradients of W, b (NULL: frozen) and the adapter. */
static int linear_backward(float *dx, float *dW, float *db, const float *dy, const float *x,
                           const float *W, Adapted ad, int site, int N, int in, int out,
                           int accumulate) {
    return matmul_backward(dx, dW, db, dy, x, W, N, in, out, accumulate) |
           lora_backward(dx, dy, x, ad, site, N, in, out);
}

/* l->h (N,F) = the activation of norm2's output through fc1 (and gate). */
static int mlp_forward(const ModelConfig *cfg, const LayerTensors *w, const LayerActs *l,
                       Adapted ad, int N) {
    int C = cfg->C, F = cfg->F, st = 0;
    long n = (long)N * F;
    switch (cfg->mlp) {
    case MLP_RELU: /* fused: h = max(ln2 @ fc1 + b, 0), no pre-activation kept */
        if (!site_field(ad.lora ? ad.lora->a : NULL, ad.l, SITE_FC1))
            return matmul_relu_forward(l->h, l->ln2, w->fc1, w->fc1_b, N, C, F);
        st |= linear_forward(l->h, l->ln2, w->fc1, w->fc1_b, ad, SITE_FC1, N, C, F);
        relu_forward(l->h, l->h, n);
        return st;
    case MLP_GELU:
        st |= linear_forward(l->pre, l->ln2, w->fc1, w->fc1_b, ad, SITE_FC1, N, C, F);
        gelu_forward(l->h, l->pre, n);
        return st;
    default: /* MLP_SWIGLU: h = silu(ln2 @ gate) * (ln2 @ fc1) */
        st |= linear_forward(l->gate, l->ln2, w->gate, w->gate_b, ad, SITE_GATE, N, C, F);
        st |= linear_forward(l->pre, l->ln2, w->fc1, w->fc1_b, ad, SITE_FC1, N, C, F);
        swiglu_forward(l->h, l->gate, l->pre, n);
        return st;
    }
}

/* Mirror of mlp_forward: a->dh holds dL/dh; adds norm2's output gradient
 * into a->dln (written, then accumulated over gate). */
static int mlp_backward(const ModelConfig *cfg, const LayerTensors *w, const LayerTensors *g,
                        const LayerActs *l, const ModelActs *a, Adapted ad, int N) {
    int C = cfg->C, F = cfg->F, st = 0;
    long n = (long)N * F;
    switch (cfg->mlp) {
    case MLP_RELU: /* h > 0 exactly where fc1's output is: relu's mask without keeping it */
        relu_backward(a->dh, a->dh, l->h, n);
        break;
    case MLP_GELU:
        gelu_backward(a->dh, a->dh, l->pre, n);
        break;
    default: /* MLP_SWIGLU */
        swiglu_backward(a->dgate, a->dh, a->dh, l->gate, l->pre, n);
        st |= linear_backward(a->dln, g->fc1, g->fc1_b, a->dh, l->ln2, w->fc1, ad, SITE_FC1, N,
                              C, F, 0);
        return st | linear_backward(a->dln, g->gate, g->gate_b, a->dgate, l->ln2, w->gate, ad,
                                    SITE_GATE, N, C, F, 1);
    }
    return linear_backward(a->dln, g->fc1, g->fc1_b, a->dh, l->ln2, w->fc1, ad, SITE_FC1, N, C,
                           F, 0);
}

/* One block: l->x -> out. seeds: this block's two dropout seeds, or NULL. */
static int block_forward(const ModelConfig *cfg, const LayerTensors *w, Adapted ad,
                         const LayerActs *l, const ModelActs *a, float *out, int B, int T,
                         float p, const unsigned long long *seeds) {
    int N = B * T, C = cfg->C, Q = q_width(cfg), KVC = kv_width(cfg), hs = head_size(cfg);
    int st = 0;
    /* attention sublayer */
    norm_forward(cfg, l->ln1, l->mean1, l->rstd1, l->x, w->ln1_w, w->ln1_b, N);
    st |= linear_forward(l->q, l->ln1, w->q, w->q_b, ad, SITE_Q, N, C, Q);
    st |= linear_forward(l->k, l->ln1, w->k, w->k_b, ad, SITE_K, N, C, KVC);
    st |= linear_forward(l->v, l->ln1, w->v, w->v_b, ad, SITE_V, N, C, KVC);
    if (cfg->pos == POS_ROPE) {
        rope_forward(l->q, a->rope_cos, a->rope_sin, B, T, cfg->NH, hs);
        rope_forward(l->k, a->rope_cos, a->rope_sin, B, T, cfg->KVH, hs);
    }
    st |= attention_forward(l->att, l->lse, l->q, l->k, l->v, B, T, cfg->NH, cfg->KVH, hs);
    st |= linear_forward(a->branch, l->att, w->proj, w->proj_b, ad, SITE_PROJ, N, Q, C);
    residual_forward(l->xmid, l->x, a->branch, (long)N * C, p, seeds);
    /* MLP sublayer */
    norm_forward(cfg, l->ln2, l->mean2, l->rstd2, l->xmid, w->ln2_w, w->ln2_b, N);
    st |= mlp_forward(cfg, w, l, ad, N);
    st |= linear_forward(a->branch, l->h, w->fc2, w->fc2_b, ad, SITE_FC2, N, cfg->F, C);
    residual_forward(out, l->xmid, a->branch, (long)N * C, p, seeds ? seeds + 1 : NULL);
    return st;
}

/* Mirror of block_forward: a->dx holds dL/d(out) and becomes dL/d(l->x). */
static int block_backward(const ModelConfig *cfg, const LayerTensors *w, const LayerTensors *g,
                          Adapted ad, const LayerActs *l, const ModelActs *a, int B, int T,
                          float p, const unsigned long long *seeds) {
    int N = B * T, C = cfg->C, Q = q_width(cfg), KVC = kv_width(cfg), hs = head_size(cfg);
    int st = 0;
    long n = (long)N * C;
    /* MLP sublayer */
    const float *dbranch = branch_backward(a->dbranch, a->dx, n, p, seeds ? seeds + 1 : NULL);
    st |= linear_backward(a->dh, g->fc2, g->fc2_b, dbranch, l->h, w->fc2, ad, SITE_FC2, N,
                          cfg->F, C, 0);
    st |= mlp_backward(cfg, w, g, l, a, ad, N);
    norm_backward(cfg, a->dx, g->ln2_w, g->ln2_b, a->dx, a->dln, l->xmid, w->ln2_w, l->mean2,
                  l->rstd2, N);
    /* attention sublayer (a->dx is now dL/d(xmid)) */
    dbranch = branch_backward(a->dbranch, a->dx, n, p, seeds);
    st |= linear_backward(a->datt, g->proj, g->proj_b, dbranch, l->att, w->proj, ad, SITE_PROJ,
                          N, Q, C, 0);
    st |= attention_backward(a->dq, a->dk, a->dv, a->datt, l->q, l->k, l->v, l->att, l->lse,
                             B, T, cfg->NH, cfg->KVH, hs);
    if (cfg->pos == POS_ROPE) {
        rope_backward(a->dq, a->rope_cos, a->rope_sin, B, T, cfg->NH, hs);
        rope_backward(a->dk, a->rope_cos, a->rope_sin, B, T, cfg->KVH, hs);
    }
    /* norm1's output feeds q, k and v: its gradient is the sum of three */
    st |= linear_backward(a->dln, g->q, g->q_b, a->dq, l->ln1, w->q, ad, SITE_Q, N, C, Q, 0);
    st |= linear_backward(a->dln, g->k, g->k_b, a->dk, l->ln1, w->k, ad, SITE_K, N, C, KVC, 1);
    st |= linear_backward(a->dln, g->v, g->v_b, a->dv, l->ln1, w->v, ad, SITE_V, N, C, KVC, 1);
    norm_backward(cfg, a->dx, g->ln1_w, g->ln1_b, a->dx, a->dln, l->x, w->ln1_w, l->mean1,
                  l->rstd1, N);
    return st;
}

/* The head's input: the final norm's output, or the last block's. */
static const float *head_input(const ModelConfig *cfg, const ModelActs *a) {
    return cfg->final_norm ? a->lnf : a->x_final;
}

/* ids -> the head's input (the final norm's output, or the last block's) */
static int trunk_forward(const ModelConfig *cfg, const ModelTensors *w, const Lora *lora,
                         const ModelActs *a, const int *ids, int B, int T, float dropout,
                         const unsigned long long *seeds) {
    int N = B * T, C = cfg->C, st = 0;
    if (cfg->pos == POS_ROPE) rope_table(a->rope_cos, a->rope_sin, T, head_size(cfg), cfg);
    embedding_forward(a->layers[0].x, ids, w->wte, w->wpe, B, T, C);
    for (int l = 0; l < cfg->num_layers; l++) {
        float *out = l + 1 < cfg->num_layers ? a->layers[l + 1].x : a->x_final;
        st |= block_forward(cfg, &w->layers[l], (Adapted){lora, l}, &a->layers[l], a, out, B, T,
                            dropout, seeds ? seeds + 2 * l : NULL);
    }
    if (cfg->final_norm)
        norm_forward(cfg, a->lnf, a->meanf, a->rstdf, a->x_final, w->lnf_w, w->lnf_b, N);
    return st;
}

/* Where the gradient of the head's input goes before trunk_backward. */
static float *head_input_grad(const ModelConfig *cfg, const ModelActs *a) {
    return cfg->final_norm ? a->dln : a->dx;
}

/* Mirror of trunk_forward, from the head input's gradient (head_input_grad). */
static int trunk_backward(const ModelConfig *cfg, const ModelTensors *w,
                          const ModelTensors *grads, const Lora *lora, const ModelActs *a,
                          const int *ids, int B, int T, float dropout,
                          const unsigned long long *seeds) {
    int N = B * T, C = cfg->C, st = 0;
    if (cfg->final_norm)
        norm_backward(cfg, a->dx, grads->lnf_w, grads->lnf_b, NULL, a->dln, a->x_final,
                      w->lnf_w, a->meanf, a->rstdf, N);
    for (int l = cfg->num_layers - 1; l >= 0; l--) {
        const unsigned long long *block_seeds = seeds ? seeds + 2 * l : NULL;
        /* the last block's activations are still in the shared buffers; the
         * recomputed output equals what the next block's x already holds */
        if (a->recompute && l + 1 < cfg->num_layers)
            st |= block_forward(cfg, &w->layers[l], (Adapted){lora, l}, &a->layers[l], a,
                                a->layers[l + 1].x, B, T, dropout, block_seeds);
        st |= block_backward(cfg, &w->layers[l], &grads->layers[l], (Adapted){lora, l},
                             &a->layers[l], a, B, T, dropout, block_seeds);
    }
    embedding_backward(grads->wte, grads->wpe, a->dx, ids, B, T, C);
    return st;
}

int model_forward(const ModelConfig *cfg, const ModelTensors *w, const Lora *lora,
                  const ModelActs *a, const int *ids, const int *targets, int B, int T,
                  float dropout, const unsigned long long *seeds, int ignore_index,
                  double *loss) {
    int N = B * T, C = cfg->C;
    int st = trunk_forward(cfg, w, lora, a, ids, B, T, dropout, seeds);
    st |= w->head ? matmul_forward(a->logits, head_input(cfg, a), w->head, NULL, N, C, cfg->V)
                  : matmul_t_forward(a->logits, head_input(cfg, a), w->wte, N, C, cfg->V);
    if (targets)
        st |= crossentropy_forward(loss, a->losses, a->logits, targets, N, cfg->V, ignore_index);
    return st;
}

int model_backward(const ModelConfig *cfg, const ModelTensors *w, const ModelTensors *grads,
                   const Lora *lora, const ModelActs *a, const int *ids, const int *targets,
                   int B, int T, float dropout, const unsigned long long *seeds,
                   int ignore_index) {
    int N = B * T, C = cfg->C, V = cfg->V, st = 0;
    /* dlogits overwrite the logits in place: each row is read before it is written */
    crossentropy_backward(a->logits, a->logits, targets, N, V, ignore_index, 1.0f);
    float *dhead_in = head_input_grad(cfg, a);
    st |= w->head ? matmul_backward(dhead_in, grads->head, NULL, a->logits, head_input(cfg, a),
                                    w->head, N, C, V, 0)
                  : matmul_t_backward(dhead_in, grads->wte, a->logits, head_input(cfg, a),
                                      w->wte, N, C, V);
    return st | trunk_backward(cfg, w, grads, lora, a, ids, B, T, dropout, seeds);
}

int model_classify_forward(const ModelConfig *cfg, const ModelTensors *w, const Lora *lora,
                           const ModelActs *a, const int *ids, const int *lens,
                           const int *labels, int B, int T, float dropout,
                           const unsigned long long *seeds, int ignore_index, double *loss) {
    int st = trunk_forward(cfg, w, lora, a, ids, B, T, dropout, seeds);
    pool_forward(a->pooled, head_input(cfg, a), lens, B, T, cfg->C, cfg->pool);
    return st | classify_forward(a->logits, loss, a->losses, a->pooled, w->cls_w, w->cls_b,
                                 labels, B, cfg->C, cfg->L, ignore_index);
}

int model_classify_backward(const ModelConfig *cfg, const ModelTensors *w,
                            const ModelTensors *grads, const Lora *lora, const ModelActs *a,
                            const int *ids, const int *lens, const int *labels, int B, int T,
                            float dropout, const unsigned long long *seeds, int ignore_index) {
    /* dpooled goes where the trunk's gradient would otherwise start: dx is
     * free until trunk_backward, and is not the buffer it starts from when
     * there is a final norm (dln); without one, dln is the free buffer */
    float *dpooled = cfg->final_norm ? a->dx : a->dln;
    int st = classify_backward(dpooled, grads->cls_w, grads->cls_b, a->logits, a->pooled,
                               w->cls_w, labels, B, cfg->C, cfg->L, ignore_index);
    pool_backward(head_input_grad(cfg, a), dpooled, lens, B, T, cfg->C, cfg->pool);
    return st | trunk_backward(cfg, w, grads, lora, a, ids, B, T, dropout, seeds);
}
