/* sqlgpt kernel: every floating-point loop of the model, in float32.
 *
 * Contract: arrays are row-major and contiguous; the caller (Python) allocates
 * every buffer and validates every shape and token id before calling. The
 * kernel never allocates per element, never does I/O, and never calls back.
 * Parameter gradients ACCUMULATE (+=) into their buffers; zeroing them is the
 * caller's single memset per step. Activation gradients are WRITTEN (=) by
 * attention and the elementwise ops, and by matmul_backward's dinp unless
 * dinp_accumulate: a fresh buffer then needs no zeroing pass.
 *
 * Legend: N = rows (batch*time), B = batch, T = time, C = channels,
 * OC = output channels, NH = heads, V = classes.
 *
 * This header is also the CFFI cdef, so it holds declarations only: no
 * preprocessor lines, no inline code.
 */

/* matmul.c: out (N,OC) = inp (N,C) @ weight (C,OC) + bias (OC); bias may be NULL. */
void matmul_forward(float *out, const float *inp, const float *weight,
                    const float *bias, int N, int C, int OC);
/* out = max(inp @ weight, 0): the MLP's first layer and its ReLU in one pass;
 * backward is relu_backward (masked by out > 0) then matmul_backward. */
void matmul_relu_forward(float *out, const float *inp, const float *weight, int N, int C,
                         int OC);
void matmul_backward(float *dinp, float *dweight, float *dbias,
                     const float *dout, const float *inp, const float *weight,
                     int N, int C, int OC, int dinp_accumulate);

/* attention.c: causal multi-head self-attention over separate q, k, v, each
 * (B,T,C) with head h in columns [h*C/NH, (h+1)*C/NH). Keeps only the
 * log-sum-exp of each score row, lse (B,NH,T); backward recomputes scores,
 * so memory grows linearly in T. */
void attention_forward(float *out, float *lse, const float *q, const float *k,
                       const float *v, int B, int T, int C, int NH);
void attention_backward(float *dq, float *dk, float *dv, const float *dout,
                        const float *q, const float *k, const float *v,
                        const float *out, const float *lse,
                        int B, int T, int C, int NH);

/* norm.c: layernorm over the last axis; weight and bias (C) may be NULL
 * (parameter-free). mean and rstd (N) are saved for backward. */
void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int N, int C,
                       float eps);
void layernorm_backward(float *dinp, float *dweight, float *dbias,
                        const float *dout, const float *inp,
                        const float *weight, const float *mean,
                        const float *rstd, int N, int C);

/* activation.c: elementwise over n floats. */
void relu_forward(float *out, const float *inp, long n);
void relu_backward(float *dinp, const float *dout, const float *inp, long n);
void gelu_forward(float *out, const float *inp, long n);
void gelu_backward(float *dinp, const float *dout, const float *inp, long n);

/* embedding.c: out (B,T,C) = wte[ids] (V,C) + wpe[t] (T,C); ids (B,T). */
void embedding_forward(float *out, const int *ids, const float *wte,
                       const float *wpe, int B, int T, int C);
void embedding_backward(float *dwte, float *dwpe, const float *dout,
                        const int *ids, int B, int T, int C);

/* loss.c: softmax cross-entropy, mean over rows whose target is not
 * ignore_index. losses (N) receives each row's loss (0 for ignored rows);
 * returns the mean. backward writes (not accumulates) dlogits (N,V). */
double crossentropy_forward(float *losses, const float *logits,
                            const int *targets, int N, int V,
                            int ignore_index);
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

/* optim.c: Adam (weight_decay = 0) or AdamW (decoupled decay) over n floats,
 * with bias correction for the 1-based step. Hyperparameters are doubles so
 * that 1 - beta2 = 0.001 is exact to float precision (1.0f - 0.999f is not). */
void adamw_update(float *data, const float *grad, float *m, float *v, long n,
                  double lr, double beta1, double beta2, double eps,
                  double weight_decay, int step);
/* sum of squares of n floats, in double (gradient norm, finiteness check). */
double sum_squares(const float *x, long n);
void scale_inplace(float *x, long n, float factor);
void zero_floats(float *x, long n);

/* checksum.c: out[r] = zlib's CRC-32 of row r's bytes of data, m, v, one
 * after the other (each (rows, cols), bytes as they lie in memory), the
 * per-row checksum of the database's weight tables. */
void crc32_rows(uint32_t *out, const float *data, const float *m, const float *v, int rows,
                int cols);

/* decode.c: generation, one token through the whole model (preset lua)
 * with a KV cache, in one call.
 * Decode weights: W (C,OC) repacked as contiguous column panels of
 * panels_size elements, float32 or bfloat16 (bf16 = 1: float32 rounded to
 * nearest even, 8 significant bits, half the bytes to stream). */
long panels_size(int C, int OC);
void pack_panels(void *dst, const float *w, int C, int OC, int bf16);

/* wte and wpe are float32 (C wide, as in training); head and the per-layer
 * matrices (arrays of num_layers pointers) are panels from pack_panels with
 * the model's bf16 setting. kcache holds key_cache_size floats (keys
 * transposed per head), vcache (num_layers, max_T, C); positions 0..pos-1
 * must already hold the earlier tokens' keys and values. logits is (V). */
typedef struct {
    int num_layers, C, NH, V, max_T, bf16;
    float ln_eps;
    const float *wte, *wpe;
    const void *head;
    const void **q, **k, **v, **proj, **fc1, **fc2;
} DecodeModel;

long key_cache_size(const DecodeModel *m);
void decode_step(const DecodeModel *m, float *kcache, float *vcache, int token,
                 int pos, float *logits);
