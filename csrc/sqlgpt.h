/* sqlgpt kernel: every floating-point loop of the model, in float32.
 *
 * Contract: arrays are row-major and contiguous; the caller (Python) allocates
 * every buffer and validates every shape and token id before calling. The
 * kernel never allocates per element, never does I/O, never calls back and
 * never aborts: the only allocations are per-thread scratch buffers that
 * grow, and when one cannot grow, the call skips its work and returns
 * SQLGPT_NOMEM (functions that return int return a status).
 *
 * Gradients, one rule:
 *  - parameter gradients ACCUMULATE (+=); zeroing them is the caller's one
 *    call per step (zero_floats over the grad arena);
 *  - activation gradients are WRITTEN (=), so a fresh buffer needs no
 *    zeroing pass, except matmul_backward's dinp with dinp_accumulate (the
 *    sum over q, k, v of one input);
 *  - the residual stream's backward is explicit: a norm's backward takes
 *    dskip, the gradient arriving along the skip connection, and writes
 *    dinp = dskip + (the gradient through the norm).
 *
 * Legend: N = rows (batch*time), B = batch, T = time, C = channels,
 * OC = output channels, NH = query heads, KVH = key/value heads,
 * hs = head size (HS: C / NH unless a model says otherwise), Q = NH * hs
 * the attention's width, F = MLP hidden size, V = vocabulary.
 *
 * This header is also the CFFI cdef, so it holds declarations only: no
 * preprocessor lines, no inline code.
 */

enum { SQLGPT_OK = 0, SQLGPT_NOMEM = 1 };

/* governor.c: the threads parallel regions use. set_threads fixes the
 * count; set_thread_ceiling lets the governor choose, unit by unit, up to n
 * (the default, up to OpenMP's count). A unit of work (a decode step, a
 * training step) runs between threads_unit_begin and _end on the calling
 * thread, keyed by its model (any stable pointer) and sized by its work
 * (tokens): units of one key and size are timed together. */
void set_threads(int n);
void set_thread_ceiling(int n);
int max_threads(void);
void threads_unit_begin(const void *key, double work);
void threads_unit_end(void);
int governed_threads(const void *key); /* the count the key's units run on now */
int threads_unit_depth(void);          /* units open on the calling thread */

/* ---- the model, described once ---- */
enum { NORM_LAYERNORM = 0, NORM_RMSNORM = 1 };
enum { POS_LEARNED = 0, POS_SINUSOIDAL = 1, POS_ROPE = 2, POS_NONE = 3 };
enum { MLP_RELU = 0, MLP_GELU = 1, MLP_SWIGLU = 2 };
enum { ROPE_SCALING_NONE = 0, ROPE_SCALING_LINEAR = 1, ROPE_SCALING_LLAMA3 = 2 };
enum { POOL_LAST = 0, POOL_MEAN = 1 };

/* The architecture: which parts a block has and its sizes. Optional
 * parameters (norm gains and biases, linear biases, a learned wpe, the
 * head) are present exactly where their pointer in ModelTensors is not
 * NULL; a NULL head means the head is wte transposed (tied). */
typedef struct {
    int num_layers, C, NH, KVH, HS, F, V, max_T;
    int norm, pos, mlp, final_norm;
    float norm_eps, rope_theta;
    /* rope's frequencies stretched (contract.ROPE_SCALINGS): by rope_factor,
     * llama3 between wavelengths rope_original_T / rope_high_freq and
     * rope_original_T / rope_low_freq */
    int rope_scaling, rope_original_T;
    float rope_factor, rope_low_freq, rope_high_freq;
    /* a classifier's L labels (0: none) and how it pools a sequence (POOL_*) */
    int L, pool;
} ModelConfig;

/* One block's parameters (in, out): q (C,Q), k and v (C,KVH*hs), proj
 * (Q,C), gate and fc1 (C,F), fc2 (F,C); *_w, *_b are norm gains and biases
 * (C), q_b ... fc2_b linear biases (OC). gate exists for MLP_SWIGLU:
 * fc2(silu(x @ gate) * (x @ fc1)). In a decoder the matrices point at
 * pack_panels' layout instead. */
typedef struct {
    float *ln1_w, *ln1_b, *q, *q_b, *k, *k_b, *v, *v_b, *proj, *proj_b;
    float *ln2_w, *ln2_b, *gate, *gate_b, *fc1, *fc1_b, *fc2, *fc2_b;
} LayerTensors;

/* wte (V,C); wpe (max_T,C): learned, or the fixed sinusoids (with no
 * gradient) for POS_SINUSOIDAL, NULL otherwise; lnf_w, lnf_b (C) the final
 * norm; head (C,V) or NULL (tied); cls_w (C,L), cls_b (L) a classifier's
 * head (NULL without one); layers (num_layers). */
typedef struct {
    float *wte, *wpe, *lnf_w, *lnf_b, *head, *cls_w, *cls_b;
    LayerTensors *layers;
} ModelTensors;

/* What one layer's forward keeps for backward. x (N,C) its input; ln1, ln2
 * (N,C) norm outputs with mean1/rstd1, mean2/rstd2 (N); q (N,Q), k, v
 * (N,KVH*hs), rotated for POS_ROPE; att (N,Q) and lse (B,NH,T); xmid (N,C)
 * after the attention sublayer; pre (N,F) fc1's output (GELU's input, or
 * SwiGLU's linear half; unused for ReLU), gate (N,F) SwiGLU's gate input,
 * h (N,F) the activation, fc2's input. */
typedef struct {
    float *x, *ln1, *mean1, *rstd1, *q, *k, *v, *att, *lse, *xmid, *ln2, *mean2, *rstd2;
    float *pre, *gate, *h;
} LayerActs;

/* Every buffer of one (B,T) forward/backward: layers (num_layers); x_final
 * (N,C) the last block's output, lnf/meanf/rstdf its final norm; logits
 * (N,V), losses (N); rope_cos/rope_sin (T, hs/2); the rest is backward's
 * scratch: branch, dx, dbranch, dln (N,C), datt, dq (N,Q), dk, dv (N,KVH*hs),
 * dh, dgate (N,F). recompute = 1 is activation checkpointing: every
 * layer's LayerActs has its own x but shares all other buffers with the
 * others, and backward runs each block's forward again from its x (with
 * the same dropout seeds) just before that block's backward: the same
 * gradients, bit for bit, in one block's memory instead of num_layers'. */
typedef struct {
    LayerActs *layers;
    int recompute;
    float *x_final, *lnf, *meanf, *rstdf, *logits, *losses, *rope_cos, *rope_sin, *pooled;
    float *branch, *dx, *dbranch, *datt, *dq, *dk, *dv, *dln, *dh, *dgate;
} ModelActs;

/* LoRA (Hu et al. 2021, as PEFT applies it): an adapted matrix W (in,out)
 * of a block acts as y = x @ W + scale * (drop(x) @ A) @ B, with A
 * (in,rank) and B (rank,out) trained and W frozen. a and b (num_layers)
 * hold each adapted matrix's A and B in that matrix's field of
 * LayerTensors (q, k, v, proj, gate, fc1, fc2: the LORA_SITES sites; NULL
 * where a matrix has no adapter; the vector fields are unused); da and db
 * their gradients (accumulated; NULL in evaluation); u (num_layers) each
 * site's (N,rank) drop(x) @ A, kept for backward. xdrop (N, max(C,F,Q)) and
 * tmp (N,rank) are scratch. seeds (num_layers * LORA_SITES, site-major
 * within a layer) seed the dropout of each site's input, or NULL for none
 * (evaluation, or dropout 0). */
enum { LORA_SITES = 7 };
typedef struct {
    int rank;
    float scale, dropout;
    LayerTensors *a, *b, *da, *db, *u;
    float *xdrop, *tmp;
    const unsigned long long *seeds;
} Lora;

/* model.c: the whole model. ids, targets (B,T); targets may be NULL (then
 * no loss). seeds (2 * num_layers) are the dropout sites' seeds (after each
 * attention and each MLP), or NULL for evaluation mode (no dropout). *loss
 * receives the mean cross-entropy over targets that are not ignore_index.
 * backward needs the forward's acts, ids, targets and seeds; it overwrites
 * the logits with their gradient. grads holds the gradient of each
 * parameter of w (NULL where w's is NULL or has no gradient: a frozen
 * base). lora: the adapters, or NULL. */
int model_forward(const ModelConfig *cfg, const ModelTensors *w, const Lora *lora,
                  const ModelActs *a, const int *ids, const int *targets, int B, int T,
                  float dropout, const unsigned long long *seeds, int ignore_index,
                  double *loss);
int model_backward(const ModelConfig *cfg, const ModelTensors *w, const ModelTensors *grads,
                   const Lora *lora, const ModelActs *a, const int *ids, const int *targets,
                   int B, int T, float dropout, const unsigned long long *seeds,
                   int ignore_index);

/* A classifier (cfg->L labels): the same trunk, then each sequence b of ids
 * (B,T, padded on the right) pooled from its lens[b] positions into
 * a->pooled (B,C) (cfg->pool), a->logits (B,L) = pooled @ cls_w + cls_b,
 * and *loss the mean cross-entropy against labels (B; NULL: no loss; a
 * label of ignore_index is skipped). backward overwrites the logits with
 * their gradient. The activations are a (B,T) set whose logits and losses
 * are (B,L) and (B). */
int model_classify_forward(const ModelConfig *cfg, const ModelTensors *w, const Lora *lora,
                           const ModelActs *a, const int *ids, const int *lens,
                           const int *labels, int B, int T, float dropout,
                           const unsigned long long *seeds, int ignore_index, double *loss);
int model_classify_backward(const ModelConfig *cfg, const ModelTensors *w,
                            const ModelTensors *grads, const Lora *lora, const ModelActs *a,
                            const int *ids, const int *lens, const int *labels, int B, int T,
                            float dropout, const unsigned long long *seeds, int ignore_index);

/* decode.c: generation, one token through the whole model with a KV cache,
 * in one call, on the same ModelConfig and per-row helpers as training.
 * Decode weights, by precision: PRECISION_FP32, PRECISION_BF16 and
 * PRECISION_F16, W (C,OC) repacked as contiguous column panels of
 * panels_size elements, float32, bfloat16 (float32 rounded to nearest even,
 * 8 significant bits, half the bytes to stream) or IEEE half (11
 * significant bits, the same bytes: an F16 file's own values); PRECISION_INT8 and PRECISION_INT4, W's quant.c layout
 * (quant_size bytes) in groups of `group`, the activations quantized per
 * group on the fly (group is unused for the float formats). */
enum { PRECISION_FP32 = 0, PRECISION_BF16 = 1, PRECISION_INT8 = 2, PRECISION_INT4 = 3,
       PRECISION_F16 = 4 };
long panels_size(int C, int OC);
/* half: a precision's panel element, panel_half(precision): 0 float32, 1
 * bfloat16, 2 IEEE half */
int panel_half(int precision);
void pack_panels(void *dst, const float *w, int C, int OC, int half);
/* the same panels of W from wt, W^T (OC,C) row-major: a tied head from wte */
void pack_panels_t(void *dst, const float *wt, int C, int OC, int half);
/* the same from IEEE halves (an F16 import's tensor, with no float32 copy):
 * W (C,OC), or W^T (OC,C) where transposed */
void pack_panels_f16(void *dst, const void *w, int C, int OC, int half, int transposed);

/* w: every matrix, the head included (wte transposed when tied), in the
 * precision's layout; wte, wpe and the vectors float32 as in training.
 * A tied model's wte may be NULL where the head holds it exactly
 * (head_holds_wte): tokens are then looked up in the head's columns, so
 * the decoder keeps one copy of the embeddings, not two.
 * kcache holds key_cache_size floats (keys in blocks of positions per kv
 * head), vcache (num_layers, max_T, KVH*hs); positions 0..pos-1 must
 * already hold the earlier tokens' keys and values. logits is (V). */
long key_cache_size(const ModelConfig *cfg);
/* 1 if every column of head (C,V in precision's layout, group for int8 /
 * int4) is bit for bit the matching row of wte (V,C), else 0 (or out of
 * memory). */
int head_holds_wte(const ModelConfig *cfg, const void *head, int precision, int group,
                   const float *wte);
int decode_step(const ModelConfig *cfg, const ModelTensors *w, int precision, int group,
                float *kcache, float *vcache, int token, int pos, float *logits);
/* n rows in one step, every weight read once for all of them: row r is the
 * token tokens[r] at position pos[r] of the sequence whose caches are slot
 * slots[r] (kcache holds key_cache_size floats per slot, vcache (num_layers,
 * max_T, KVH*hs) per slot). Rows may share a slot at consecutive positions
 * (a prompt, or a draft's tokens verified at once): every row's key and
 * value is stored before any row attends. logits is (n_out, V): the rows
 * out_rows[0..n_out-1]. A row's logits are bit for bit the ones it gets
 * alone. With w->head NULL, logits receives those rows' final hidden
 * states instead, (n_out, C) (after the final norm, where the model has
 * one). decode_step is one row, slot 0. */
int decode_batch(const ModelConfig *cfg, const ModelTensors *w, int precision, int group,
                 float *kcache, float *vcache, int n, const int *slots, const int *tokens,
                 const int *pos, int n_out, const int *out_rows, float *logits);

/* quant.c: integer weights (the layout is described there). A quantized W
 * (C,OC) with bits 8 or 4 in groups of G (G a multiple of 32 dividing C)
 * takes quant_size bytes, quant_row_bytes of values per output row. */
long quant_row_bytes(int C, int bits);
long quant_size(int C, int OC, int bits, int G);
/* Such a matrix as stored (every row's values, then every row's scales)
 * rearranged in place into the layout the decoder's kernel reads (on AVX-512
 * VNNI and AVX2, blocks of quant_lanes() outputs interleaved, 16 or 8; a
 * portable build keeps the rows):
 * the layout decode_step and quant_row_values take. SQLGPT_OK, or
 * SQLGPT_NOMEM (the matrix then partly arranged: discard it). */
int quant_arrange(void *w, int C, int OC, int bits, int G);
int quant_lanes(void);
/* out (C) = the values of output j of such an arranged matrix w (OC
 * outputs): scale times value, as the products use them */
void quant_row_values(float *out, const void *w, int C, int OC, int bits, int G, int j);
/* x (n) as int8 groups of G, q (2n: the values, then their magnitudes),
 * scales (n / G): activations as decoding quantizes them. */
void quantize_q8(int8_t *q, float *scales, const float *x, int n, int G);
/* y (n,OC) = x (n,C), quantized as quantize_q8 does, times the quantized
 * W as stored (arranged in a copy): the products decoding computes. */
int quant_matmul(float *y, const float *x, int n, const void *w, int C, int OC, int bits,
                 int G);

/* ---- ops, each a forward/backward pair ---- */

/* matmul.c: out (N,OC) = inp (N,C) @ weight (C,OC) + bias (OC); bias may be NULL. */
int matmul_forward(float *out, const float *inp, const float *weight,
                   const float *bias, int N, int C, int OC);
/* out = max(inp @ weight + bias, 0): the MLP's first layer and its ReLU in
 * one pass; backward is relu_backward (masked by out > 0) then matmul_backward. */
int matmul_relu_forward(float *out, const float *inp, const float *weight, const float *bias,
                        int N, int C, int OC);
int matmul_backward(float *dinp, float *dweight, float *dbias,
                    const float *dout, const float *inp, const float *weight,
                    int N, int C, int OC, int dinp_accumulate);
/* The tied head: out (N,V) = inp (N,C) @ wte^T, wte (V,C). */
int matmul_t_forward(float *out, const float *inp, const float *wte, int N, int C, int V);
int matmul_t_backward(float *dinp, float *dwte, const float *dout, const float *inp,
                      const float *wte, int N, int C, int V);

/* attention.c: causal self-attention with NH query heads over KVH key/value
 * heads (grouped-query; KVH = NH is multi-head, 1 multi-query). q, out
 * (B,T,NH*hs), k, v (B,T,KVH*hs); query head h reads kv head h / (NH/KVH).
 * Keeps only the log-sum-exp of each score row, lse (B,NH,T); backward
 * recomputes scores, so memory grows linearly in T. */
int attention_forward(float *out, float *lse, const float *q, const float *k,
                      const float *v, int B, int T, int NH, int KVH, int hs);
int attention_backward(float *dq, float *dk, float *dv, const float *dout,
                       const float *q, const float *k, const float *v,
                       const float *out, const float *lse,
                       int B, int T, int NH, int KVH, int hs);

/* norm.c: layernorm or RMSNorm over the last axis; weight and bias (C) may
 * be NULL (parameter-free). mean (layernorm only) and rstd (N) are saved
 * for backward; dskip (N,C) may be NULL (no skip connection) or dinp. */
void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int N, int C,
                       float eps);
void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dskip,
                        const float *dout, const float *inp, const float *weight,
                        const float *mean, const float *rstd, int N, int C);
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight,
                     int N, int C, float eps);
void rmsnorm_backward(float *dinp, float *dweight, const float *dskip, const float *dout,
                      const float *inp, const float *weight, const float *rstd, int N, int C);

/* classify.c: the classifier's head. pool_forward: pooled (B,C) from h
 * (B,T,C), sequence b's position lens[b] - 1 (POOL_LAST) or the mean of its
 * positions below lens[b] (POOL_MEAN; lens clamped to 1..T); pool_backward
 * writes dh (B,T,C) whole (zero where nothing was pooled). classify_forward:
 * logits (B,L) = pooled @ W (C,L) + bias, and with labels (B) the mean
 * cross-entropy (losses (B)); classify_backward turns the logits into their
 * gradient in place and gives dpooled (=) and dW, dbias (+=). */
void pool_forward(float *pooled, const float *h, const int *lens, int B, int T, int C, int pool);
void pool_backward(float *dh, const float *dpooled, const int *lens, int B, int T, int C,
                   int pool);
int classify_forward(float *logits, double *loss, float *losses, const float *pooled,
                     const float *W, const float *bias, const int *labels, int B, int C, int L,
                     int ignore_index);
int classify_backward(float *dpooled, float *dW, float *dbias, float *logits,
                      const float *pooled, const float *W, const int *labels, int B, int C,
                      int L, int ignore_index);

/* rope.c: rotary position embeddings on x (B,T,heads*hs) in place, pairs
 * (i, i + hs/2) of each head rotated by angle t * theta^(-2i/hs), the
 * layout of transformers' llama (rotate_half). cos, sin (T, hs/2) from
 * rope_table; backward rotates the gradient back (also in place). */
void rope_table(float *cos, float *sin, int T, int hs, const ModelConfig *cfg);
void rope_forward(float *x, const float *cos, const float *sin, int B, int T, int heads, int hs);
void rope_backward(float *dx, const float *cos, const float *sin, int B, int T, int heads,
                   int hs);

/* activation.c: elementwise over n floats; backward writes dinp. */
void relu_forward(float *out, const float *inp, long n);
void relu_backward(float *dinp, const float *dout, const float *inp, long n);
void gelu_forward(float *out, const float *inp, long n);
void gelu_backward(float *dinp, const float *dout, const float *inp, long n);
/* SwiGLU's product: h = silu(gate) * up; backward writes dgate and dup
 * (dup may be dh itself: each element is read before it is written). */
void swiglu_forward(float *h, const float *gate, const float *up, long n);
void swiglu_backward(float *dgate, float *dup, const float *dh, const float *gate,
                     const float *up, long n);

/* embedding.c: out (B,T,C) = wte[ids] (V,C) + wpe[t] (T,C); ids (B,T);
 * wpe may be NULL (no added positions), and so may dwpe; dwte NULL (a
 * frozen base) skips the whole backward. */
void embedding_forward(float *out, const int *ids, const float *wte,
                       const float *wpe, int B, int T, int C);
void embedding_backward(float *dwte, float *dwpe, const float *dout,
                        const int *ids, int B, int T, int C);

/* loss.c: softmax cross-entropy, mean over rows whose target is not
 * ignore_index. losses (N) receives each row's loss (0 for ignored rows);
 * *loss the mean. backward writes (not accumulates) dlogits (N,V). */
int crossentropy_forward(double *loss, float *losses, const float *logits,
                         const int *targets, int N, int V, int ignore_index);
void crossentropy_backward(float *dlogits, const float *logits,
                           const int *targets, int N, int V, int ignore_index,
                           float dloss);

/* dropout.c: inverted dropout with a counter-based mask (a hash of seed and
 * element index), so backward recomputes the mask instead of storing it and
 * the result does not depend on the thread count. */
void dropout_forward(float *out, const float *inp, long n, float p,
                     unsigned long long seed);
void dropout_backward(float *dinp, const float *dout, long n, float p,
                      unsigned long long seed);
/* out = x + dropout_forward(branch) in one pass (the same mask). */
void residual_dropout_forward(float *out, const float *x, const float *branch, long n,
                              float p, unsigned long long seed);

/* optim.c: Adam over n floats with bias correction for the 1-based step;
 * weight_decay decoupled (AdamW, torch.optim.AdamW) or, with decoupled = 0,
 * added to the gradient (L2, torch.optim.Adam). Hyperparameters are doubles
 * so that 1 - beta2 = 0.001 is exact to float precision (1.0f - 0.999f is
 * not). SGD with momentum (buf: the momentum buffer, zero at the start) and
 * L2 weight decay, as torch.optim.SGD without dampening or Nesterov. */
void adamw_update(float *data, const float *grad, float *m, float *v, long n,
                  double lr, double beta1, double beta2, double eps,
                  double weight_decay, int decoupled, int step);
void sgd_update(float *data, const float *grad, float *momentum_buf, long n, double lr,
                double momentum, double weight_decay);
/* sum of squares of n floats, in double (gradient norm, finiteness check). */
double sum_squares(const float *x, long n);
void scale_inplace(float *x, long n, float factor);
void zero_floats(float *x, long n);

/* checksum.c: out[r] = zlib's CRC-32 of row r's bytes of data, m, v, one
 * after the other (each (rows, cols), bytes as they lie in memory), the
 * per-row checksum of the database's weight tables. */
void crc32_rows(uint32_t *out, const float *data, const float *m, const float *v, int rows,
                int cols);
/* zlib's crc32(crc, bytes, n): crc continued over n more bytes (0 to start). */
uint32_t crc32_bytes(uint32_t crc, const void *bytes, size_t n);

/* sample.c: sqlgpt's Sampler, for Python and the extension alike (the same
 * token for the same seed). Pcg64 is numpy's PCG64 bit generator, each
 * 128-bit word as two halves, low first; pcg64_seed(seed) is
 * np.random.default_rng(seed)'s, pcg64_random Generator.random(), and
 * pcg64_choice Generator.choice(n, p=probs) (probs overwritten). */
typedef struct { uint64_t state[2], inc[2]; } Pcg64;
void pcg64_seed(Pcg64 *rng, uint64_t seed);
double pcg64_random(Pcg64 *rng);
int pcg64_choice(double *probs, int n, Pcg64 *rng);

/* How the next token is drawn: repetition_penalty (> 1 makes ids in the
 * context less likely), temperature (0: greedy), top_k (0: all), top_p,
 * min_p, in that order (sqlgpt.inference.generate.Sampler). */
typedef struct {
    double temperature, top_p, min_p, repetition_penalty;
    int top_k;
} SamplerConfig;
/* The next token from logits (V): context (n_context ids) for the penalty,
 * banned ids never drawn; probs and scratch V doubles and order V ints of
 * scratch. -1 when the logits hold NaN (or ban every id). */
int sample_token(const float *logits, int V, const SamplerConfig *s, const int *context,
                 int n_context, const int *banned, int n_banned, Pcg64 *rng, double *probs,
                 double *scratch, int *order);
/* The distribution sample_token draws from, in probs (greedy: all on the
 * most likely id); 0, or -1 as above. */
int sampler_probs(const float *logits, int V, const SamplerConfig *s, const int *context,
                  int n_context, const int *banned, int n_banned, double *probs,
                  double *scratch, int *order);
/* decode_batch's single row (token at pos in slot's caches, logits (V))
 * and sample_token on its logits in one call: the next id, -1 (NaN logits
 * or every id banned), or -1 - a status (SQLGPT_NOMEM). */
int decode_sample(const ModelConfig *cfg, const ModelTensors *w, int precision, int group,
                  float *kcache, float *vcache, int slot, int token, int pos, float *logits,
                  const SamplerConfig *s, const int *context, int n_context, const int *banned,
                  int n_banned, Pcg64 *rng, double *probs, double *scratch, int *order);
/* Up to n ids of one sequence in one call: token at pos, then each id drawn
 * at the next position, each written to out and appended to context
 * (capacity n_context + n). Ends after n ids, after eos_id, or at the
 * context's end (max_T). The number of ids written, or a negative value as
 * decode_sample gives. */
int decode_sample_run(const ModelConfig *cfg, const ModelTensors *w, int precision, int group,
                      float *kcache, float *vcache, int slot, int token, int pos, float *logits,
                      const SamplerConfig *s, int *context, int n_context, const int *banned,
                      int n_banned, int eos_id, Pcg64 *rng, double *probs, double *scratch,
                      int *order, int n, int *out);
