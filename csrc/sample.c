/* Sampling as sqlgpt's Sampler defines it, for Python and the extension
 * alike: numpy's default_rng(seed) (a SeedSequence seeding PCG64),
 * Generator.random() and Generator.choice(n, p=probs), and the Sampler's
 * repetition penalty, temperature, top-k, top-p and min-p, each computed as
 * the numpy code that defined them did (pairwise sums, a stable sort, the
 * k-th largest by value), so a seed gives the same tokens it always gave. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "sqlgpt.h"

typedef unsigned __int128 u128;

/* numpy's SeedSequence (bit_generator.pyx): a 4-word pool mixed from the
 * seed's 32-bit words, then 8 words drawn from it. */
#define INIT_A 0x43b0d7e5u
#define MULT_A 0x931e8875u
#define INIT_B 0x8b51f9ddu
#define MULT_B 0x58f38dedu
#define MIX_MULT_L 0xca01f9ddu
#define MIX_MULT_R 0x4973f715u
#define XSHIFT 16
#define POOL 4

static uint32_t hashmix(uint32_t value, uint32_t *hash_const) {
    value ^= *hash_const;
    *hash_const *= MULT_A;
    value *= *hash_const;
    value ^= value >> XSHIFT;
    return value;
}

static uint32_t mix(uint32_t x, uint32_t y) {
    uint32_t result = MIX_MULT_L * x - MIX_MULT_R * y;
    return result ^ (result >> XSHIFT);
}

static void seed_sequence(uint64_t seed, uint32_t *out, int n_words) {
    uint32_t entropy[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    int n_entropy = seed >> 32 ? 2 : 1; /* an int's 32-bit words, least first */
    uint32_t pool[POOL], hash_const = INIT_A;
    for (int i = 0; i < POOL; i++) pool[i] = hashmix(i < n_entropy ? entropy[i] : 0, &hash_const);
    for (int src = 0; src < POOL; src++)
        for (int dst = 0; dst < POOL; dst++)
            if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], &hash_const));
    hash_const = INIT_B;
    for (int i = 0; i < n_words; i++) {
        uint32_t value = pool[i % POOL] ^ hash_const;
        hash_const *= MULT_B;
        value *= hash_const;
        out[i] = value ^ (value >> XSHIFT);
    }
}

#define PCG_MULT (((u128)0x2360ed051fc65da4ULL << 64) | 0x4385df649fccf645ULL)

/* Pcg64 keeps each 128-bit word as two 64-bit halves (CFFI has no 128-bit
 * type), low half first */
static u128 join128(const uint64_t *w) { return (u128)w[1] << 64 | w[0]; }
static void split128(uint64_t *w, u128 x) { w[0] = (uint64_t)x, w[1] = (uint64_t)(x >> 64); }

void pcg64_seed(Pcg64 *rng, uint64_t seed) {
    uint32_t words[8];
    seed_sequence(seed, words, 8);
    uint64_t s[4];
    for (int i = 0; i < 4; i++) s[i] = words[2 * i] | (uint64_t)words[2 * i + 1] << 32;
    u128 initstate = (u128)s[0] << 64 | s[1], initseq = (u128)s[2] << 64 | s[3];
    u128 inc = initseq << 1 | 1, state = 0;
    state = state * PCG_MULT + inc;
    state += initstate;
    state = state * PCG_MULT + inc;
    split128(rng->state, state);
    split128(rng->inc, inc);
}

static uint64_t pcg64_next(Pcg64 *rng) {
    u128 state = join128(rng->state) * PCG_MULT + join128(rng->inc);
    split128(rng->state, state);
    uint64_t hi = (uint64_t)(state >> 64), lo = (uint64_t)state;
    unsigned rot = (unsigned)(state >> 122);
    uint64_t x = hi ^ lo;
    return (x >> rot) | (x << ((-rot) & 63));
}

double pcg64_random(Pcg64 *rng) { return (pcg64_next(rng) >> 11) * (1.0 / 9007199254740992.0); }

/* numpy's pairwise summation of float64 (what probs.sum() computes). */
static double pairwise_sum(const double *a, long n) {
    if (n < 8) {
        double res = 0.0;
        for (long i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8];
        for (int k = 0; k < 8; k++) r[k] = a[k];
        long i;
        for (i = 8; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++) r[k] += a[i + k];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    long n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* Generator.choice(n, p=probs): the cumulative sum, normalized by its last
 * value, searched (side right) for one uniform draw. probs is overwritten. */
int pcg64_choice(double *probs, int n, Pcg64 *rng) {
    for (int i = 1; i < n; i++) probs[i] += probs[i - 1];
    double last = probs[n - 1], u = pcg64_random(rng);
    for (int i = 0; i < n; i++)
        if (probs[i] / last > u) return i;
    return n - 1;
}

static void normalize(double *probs, int V) {
    double total = pairwise_sum(probs, V);
    for (int i = 0; i < V; i++) probs[i] /= total;
}

/* The k-th largest of a (n values, k in 1..n), as np.partition(a, -k)[-k]:
 * a quickselect on scratch, a copy. */
static double kth_largest(const double *a, int n, int k, double *scratch) {
    memcpy(scratch, a, sizeof(double) * (size_t)n);
    int lo = 0, hi = n - 1, want = n - k;  /* its index in ascending order */
    while (lo < hi) {
        double pivot = scratch[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (scratch[i] < pivot) i++;
            while (scratch[j] > pivot) j--;
            if (i <= j) {
                double t = scratch[i];
                scratch[i++] = scratch[j], scratch[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return scratch[want];
}

/* order (V ids) sorted by descending probability, ties in index order:
 * np.argsort(-probs, kind="stable"); a bottom-up merge sort through tmp. */
static void sort_by_prob(int *order, int V, const double *probs, int *tmp) {
    for (int i = 0; i < V; i++) order[i] = i;
    for (int width = 1; width < V; width *= 2) {
        for (int lo = 0; lo < V; lo += 2 * width) {
            int mid = lo + width < V ? lo + width : V, hi = lo + 2 * width < V ? lo + 2 * width : V;
            int i = lo, j = mid, k = lo;
            while (i < mid && j < hi) tmp[k++] = probs[order[j]] > probs[order[i]] ? order[j++]
                                                                                  : order[i++];
            while (i < mid) tmp[k++] = order[i++];
            while (j < hi) tmp[k++] = order[j++];
        }
        memcpy(order, tmp, sizeof(int) * (size_t)V);
    }
}

/* probs (V) renormalized over the ids whose mass before them, most likely
 * first, is under top_p: np.cumsum(sorted) - sorted < top_p, each rank
 * tested as numpy tests it. */
static void keep_top_p(double *probs, int V, double top_p, int *order, int *tmp) {
    sort_by_prob(order, V, probs, tmp);
    double cumulative = 0.0;
    for (int r = 0; r < V; r++) {
        double p = probs[order[r]];
        cumulative += p;
        tmp[r] = cumulative - p < top_p;
    }
    for (int r = 0; r < V; r++)
        if (!tmp[r]) probs[order[r]] = 0.0;
    normalize(probs, V);
}

/* The Sampler's logits: float64, the repetition penalty on every id in
 * the context once (positive logits divided by it, negative multiplied),
 * banned ids at -inf. */
static void penalized(double *out, const float *logits, int V, const SamplerConfig *s,
                      const int *context, int n_context, const int *banned, int n_banned,
                      int *seen) {
    for (int i = 0; i < V; i++) out[i] = (double)logits[i];
    if (s->repetition_penalty != 1.0) {
        memset(seen, 0, sizeof(int) * (size_t)V);
        for (int c = 0; c < n_context; c++) {
            int id = context[c];
            if (id < 0 || id >= V || seen[id]) continue;
            seen[id] = 1;
            out[id] = out[id] > 0 ? out[id] / s->repetition_penalty
                                  : out[id] * s->repetition_penalty;
        }
    }
    for (int b = 0; b < n_banned; b++)
        if (banned[b] >= 0 && banned[b] < V) out[banned[b]] = -INFINITY;
}

static int argmax(const double *x, int V) {  /* np.argmax: the first maximum; a NaN wins */
    int best = 0;
    for (int i = 0; i < V; i++) {
        if (isnan(x[i])) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}

/* The distribution the next token is drawn from, in probs (V): for
 * greedy, all of it on the most likely id. 0, or -1 (NaN, or every id
 * banned). */
int sampler_probs(const float *logits, int V, const SamplerConfig *s, const int *context,
                  int n_context, const int *banned, int n_banned, double *probs,
                  double *scratch, int *order) {
    penalized(probs, logits, V, s, context, n_context, banned, n_banned, order);
    if (s->temperature == 0.0) {
        int best = argmax(probs, V);
        if (!(probs[best] > -INFINITY)) return -1;
        for (int i = 0; i < V; i++) probs[i] = i == best;
        return 0;
    }
    double top = -INFINITY;
    for (int i = 0; i < V; i++) {
        if (isnan(probs[i])) return -1;
        if (probs[i] > top) top = probs[i];
    }
    if (!isfinite(top)) return -1;
    for (int i = 0; i < V; i++) probs[i] = (probs[i] - top) / s->temperature;
    if (s->top_k > 0 && s->top_k < V) {
        double kth = kth_largest(probs, V, s->top_k, scratch);
        for (int i = 0; i < V; i++)
            if (probs[i] < kth) probs[i] = -INFINITY;
    }
    double second = -INFINITY;
    for (int i = 0; i < V; i++)
        if (probs[i] > second) second = probs[i];
    for (int i = 0; i < V; i++) probs[i] = exp(probs[i] - second);
    normalize(probs, V);
    if (s->top_p < 1.0) keep_top_p(probs, V, s->top_p, order, (int *)scratch);
    if (s->min_p > 0) {
        double most = probs[argmax(probs, V)], floor = s->min_p * most;
        for (int i = 0; i < V; i++)
            if (!(probs[i] >= floor)) probs[i] = 0.0;
        normalize(probs, V);
    }
    return 0;
}

int sample_token(const float *logits, int V, const SamplerConfig *s, const int *context,
                 int n_context, const int *banned, int n_banned, Pcg64 *rng, double *probs,
                 double *scratch, int *order) {
    if (s->temperature == 0.0) {  /* np.argmax of the penalized logits (a NaN wins) */
        penalized(probs, logits, V, s, context, n_context, banned, n_banned, order);
        return argmax(probs, V);
    }
    if (sampler_probs(logits, V, s, context, n_context, banned, n_banned, probs, scratch,
                      order))
        return -1;
    return pcg64_choice(probs, V, rng);
}

/* One token of one sequence in one call: decode token at position pos of
 * cache slot `slot` (decode_batch's single row, so the same logits), then
 * draw the next id from its logits (V floats of scratch) as sample_token
 * does. The next id, or -1 (NaN logits, or every id banned), or
 * -1 - SQLGPT_NOMEM. Generation's per-token work outside the model is one
 * call: no Python between the step and the draw. */
int decode_sample(const ModelConfig *cfg, const ModelTensors *w, int precision, int group,
                  float *kcache, float *vcache, int slot, int token, int pos, float *logits,
                  const SamplerConfig *s, const int *context, int n_context, const int *banned,
                  int n_banned, Pcg64 *rng, double *probs, double *scratch, int *order) {
    int row = 0;
    int status = decode_batch(cfg, w, precision, group, kcache, vcache, 1, &slot, &token, &pos,
                              1, &row, logits);
    if (status) return -1 - status;
    return sample_token(logits, cfg->V, s, context, n_context, banned, n_banned, rng, probs,
                        scratch, order);
}

/* Up to n tokens of one sequence in one call: token goes in at position
 * pos of cache slot `slot`, each id drawn goes in at the next position,
 * and so on (decode_sample each time). Every id drawn is written to out
 * and appended to context (capacity n_context + n: the repetition penalty
 * reads it). Ends after n ids, after eos_id (written, not fed), or when
 * the next position would pass the context (max_T). The ids written, or
 * as decode_sample a negative value. Python then makes one call for many
 * tokens: its loop costs nothing per token but reading them. */
int decode_sample_run(const ModelConfig *cfg, const ModelTensors *w, int precision, int group,
                      float *kcache, float *vcache, int slot, int token, int pos, float *logits,
                      const SamplerConfig *s, int *context, int n_context, const int *banned,
                      int n_banned, int eos_id, Pcg64 *rng, double *probs, double *scratch,
                      int *order, int n, int *out) {
    int made = 0;
    while (made < n && pos < cfg->max_T) {
        int next = decode_sample(cfg, w, precision, group, kcache, vcache, slot, token, pos,
                                 logits, s, context, n_context, banned, n_banned, rng, probs,
                                 scratch, order);
        if (next < 0) return next;
        out[made++] = next;
        context[n_context++] = next;
        if (next == eos_id) break;
        token = next, pos++;
    }
    return made;
}
