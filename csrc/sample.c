/* Sampling as the Python package samples: numpy's default_rng(seed) (a
 * SeedSequence seeding PCG64), Generator.random() and Generator.choice(n,
 * p=probs), and sqlgpt's Sampler for a temperature, so that the extension
 * draws the same token as sqlgpt for the same seed. */
#include <math.h>
#include "ext.h"

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

#define PCG_MULT (((unsigned __int128)0x2360ed051fc65da4ULL << 64) | 0x4385df649fccf645ULL)

static void pcg_step(Pcg64 *rng) { rng->state = rng->state * PCG_MULT + rng->inc; }

void pcg64_seed(Pcg64 *rng, uint64_t seed) {
    uint32_t words[8];
    seed_sequence(seed, words, 8);
    uint64_t s[4];
    for (int i = 0; i < 4; i++) s[i] = words[2 * i] | (uint64_t)words[2 * i + 1] << 32;
    unsigned __int128 initstate = (unsigned __int128)s[0] << 64 | s[1];
    unsigned __int128 initseq = (unsigned __int128)s[2] << 64 | s[3];
    rng->state = 0;
    rng->inc = initseq << 1 | 1;
    pcg_step(rng);
    rng->state += initstate;
    pcg_step(rng);
}

static uint64_t pcg64_next(Pcg64 *rng) {
    pcg_step(rng);
    uint64_t hi = (uint64_t)(rng->state >> 64), lo = (uint64_t)rng->state;
    unsigned rot = (unsigned)(rng->state >> 122);
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

static int is_banned(int id, const int *banned, int n_banned) {
    for (int i = 0; i < n_banned; i++)
        if (banned[i] == id) return 1;
    return 0;
}

/* np.argmax of the float64 logits with banned ids at -inf (a NaN wins). */
static int greedy(const float *logits, int V, const int *banned, int n_banned) {
    int best = -1;
    double best_value = 0.0;
    for (int i = 0; i < V; i++) {
        double x = is_banned(i, banned, n_banned) ? -INFINITY : (double)logits[i];
        if (isnan(x)) return i;
        if (best < 0 || x > best_value) best = i, best_value = x;
    }
    return best;
}

int sample_token(const float *logits, int V, double temperature, const int *banned,
                 int n_banned, Pcg64 *rng, double *probs) {
    if (temperature == 0.0) return greedy(logits, V, banned, n_banned);
    double top = -INFINITY;
    for (int i = 0; i < V; i++) {
        probs[i] = is_banned(i, banned, n_banned) ? -INFINITY : (double)logits[i];
        if (isnan(probs[i])) return -1;
        if (probs[i] > top) top = probs[i];
    }
    if (!isfinite(top)) return -1;
    double second = -INFINITY;
    for (int i = 0; i < V; i++) {
        probs[i] = (probs[i] - top) / temperature;
        if (probs[i] > second) second = probs[i];
    }
    for (int i = 0; i < V; i++) probs[i] = exp(probs[i] - second);
    double total = pairwise_sum(probs, V);
    for (int i = 0; i < V; i++) probs[i] /= total;
    /* Generator.choice(V, p=probs): the cumulative sum, normalized by its
     * last value, searched (side right) for one uniform draw */
    for (int i = 1; i < V; i++) probs[i] += probs[i - 1];
    double last = probs[V - 1], u = pcg64_random(rng);
    for (int i = 0; i < V; i++)
        if (probs[i] / last > u) return i;
    return V - 1;
}
