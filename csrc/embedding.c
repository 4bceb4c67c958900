/* Token plus learned position embedding.
 * ids (B,T) index rows of wte (V,C); wpe is (T',C) with T <= T', or NULL
 * (rotary or no positions); out is (B,T,C). Ids are validated by the caller.
 */
#include <string.h>
#include "kernel.h"

void embedding_forward(float *out, const int *ids, const float *wte,
                       const float *wpe, int B, int T, int C) {
    #pragma omp parallel for collapse(2) schedule(static) if ((long)B * T * C > PARALLEL_MIN)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *o = out + ((size_t)b * T + t) * C;
            const float *te = wte + (size_t)ids[b * T + t] * C;
            if (!wpe) {
                memcpy(o, te, sizeof(float) * C);
                continue;
            }
            const float *pe = wpe + (size_t)t * C;
            for (int c = 0; c < C; c++) o[c] = te[c] + pe[c];
        }
}

void embedding_backward(float *dwte, float *dwpe, const float *dout,
                        const int *ids, int B, int T, int C) {
    /* Scatter-add into dwte: two rows may share an id, so threads split the
     * channels, never the tokens, and each adds tokens in order. */
    if (!dwte) return; /* frozen (a LoRA fine-tune), and so is wpe */
    #pragma omp parallel for schedule(static) if ((long)B * T * C > PARALLEL_MIN)
    for (int c0 = 0; c0 < C; c0 += 16)
        for (size_t i = 0; i < (size_t)B * T; i++) {
            float *dst = dwte + (size_t)ids[i] * C;
            const float *src = dout + i * C;
            for (int c = c0; c < C && c < c0 + 16; c++) dst[c] += src[c];
        }
    if (!dwpe) return;
    #pragma omp parallel for schedule(static) if ((long)B * T * C > PARALLEL_MIN)
    for (int t = 0; t < T; t++)
        for (int b = 0; b < B; b++) {
            const float *src = dout + ((size_t)b * T + t) * C;
            float *dst = dwpe + (size_t)t * C;
            for (int c = 0; c < C; c++) dst[c] += src[c];
        }
}
