/* Tokenizers in C, encoding to the ids the Python package gives (the rules
 * are stated in sqlgpt/data/tokenizers/): word (the original's sanitizing
 * over Unicode, with tables generated from Python's own Unicode database at
 * build time), char, byte, sqlgpt's byte-level BPE, and imported (hf) BPEs
 * as the tokenizers library runs them: added tokens, NFC, the pre-tokenizer
 * patterns of contract.PRETOKENIZER_PATTERNS as hand-written matchers, and
 * byte-level or SentencePiece-style merges. Decoding joins the ids' bytes
 * and replaces invalid UTF-8 as Python's "replace" does. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ext.h"
#include "unicode_tables.h"
#include "sqlgpt.h"
#include "contract.h"  /* PATTERN_* (its asserts read sqlgpt.h) */

int ids_push(Ids *ids, int id) {
    if (ids->n == ids->cap) {
        int cap = ids->cap ? 2 * ids->cap : 64;
        int *grown = realloc(ids->ids, sizeof(int) * (size_t)cap);
        if (!grown) return -1;
        ids->ids = grown;
        ids->cap = cap;
    }
    ids->ids[ids->n++] = id;
    return 0;
}

void ids_free(Ids *ids) {
    free(ids->ids);
    ids->ids = NULL;
    ids->n = ids->cap = 0;
}

int buf_add(Buffer *b, const void *data, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *grown = realloc(b->bytes, cap);
        if (!grown) return -1;
        b->bytes = grown;
        b->cap = cap;
    }
    memcpy(b->bytes + b->n, data, n);
    b->n += n;
    b->bytes[b->n] = 0;
    return 0;
}

void buf_free(Buffer *b) {
    free(b->bytes);
    b->bytes = NULL;
    b->n = b->cap = 0;
}

/* ---- UTF-8 ---- */
/* The code point at text[*i] (well-formed UTF-8), advancing *i. */
static uint32_t next_cp(const unsigned char *s, size_t *i) {
    uint32_t c = s[*i];
    int extra = c < 0x80 ? 0 : c < 0xe0 ? 1 : c < 0xf0 ? 2 : 3;
    if (extra) c &= 0x3f >> extra;
    (*i)++;
    for (int k = 0; k < extra; k++) c = c << 6 | (s[(*i)++] & 0x3f);
    return c;
}

static int put_cp(Buffer *b, uint32_t c) {
    unsigned char out[4];
    int n;
    if (c < 0x80) out[0] = (unsigned char)c, n = 1;
    else if (c < 0x800) out[0] = 0xc0 | c >> 6, out[1] = 0x80 | (c & 0x3f), n = 2;
    else if (c < 0x10000)
        out[0] = 0xe0 | c >> 12, out[1] = 0x80 | (c >> 6 & 0x3f), out[2] = 0x80 | (c & 0x3f), n = 3;
    else
        out[0] = 0xf0 | c >> 18, out[1] = 0x80 | (c >> 12 & 0x3f), out[2] = 0x80 | (c >> 6 & 0x3f),
        out[3] = 0x80 | (c & 0x3f), n = 4;
    return buf_add(b, out, (size_t)n);
}

/* How many bytes from s[i] form one well-formed UTF-8 character (0: s[i]
 * starts none), and in *valid the length of the longest prefix of one
 * (Python's "replace" writes one U+FFFD per such maximal prefix). */
static int utf8_char(const unsigned char *s, size_t n, size_t i, int *valid) {
    unsigned c = s[i];
    int need;
    unsigned lo = 0x80, hi = 0xbf;
    if (c < 0x80) return *valid = 1, 1;
    if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c >= 0xe0 && c <= 0xef) {
        need = 2;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        need = 3;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else return *valid = 0, 0;
    int k = 1;
    for (; k <= need && i + k < n; k++) {
        unsigned b = s[i + k];
        if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xbf)) break;
    }
    *valid = k;  /* the lead byte and the continuation bytes that fit */
    return k == need + 1 ? k : 0;
}

int utf8_valid(const char *text, size_t n) {
    for (size_t i = 0; i < n;) {
        int valid, len = utf8_char((const unsigned char *)text, n, i, &valid);
        if (!len) return 0;
        i += (size_t)len;
    }
    return 1;
}

static int decode_replace(const unsigned char *s, size_t n, Buffer *out) {
    static const unsigned char REPLACEMENT[3] = {0xef, 0xbf, 0xbd};
    for (size_t i = 0; i < n;) {
        int valid, len = utf8_char(s, n, i, &valid);
        if (len) {
            if (buf_add(out, s + i, (size_t)len)) return -1;
            i += (size_t)len;
        } else {
            if (buf_add(out, REPLACEMENT, 3)) return -1;
            i += (size_t)(valid > 0 ? valid : 1);
        }
    }
    return buf_add(out, "", 0);
}

/* ---- Unicode properties (unicode_tables.h: sorted inclusive ranges) ---- */
static int in_ranges(const uint32_t (*ranges)[2], int n, uint32_t c) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c < ranges[mid][0]) hi = mid - 1;
        else if (c > ranges[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

#define COUNT(table) ((int)(sizeof(table) / sizeof(table[0])))
static int is_alnum(uint32_t c) { return in_ranges(ALNUM, COUNT(ALNUM), c); }
static int is_space(uint32_t c) { return in_ranges(SPACE, COUNT(SPACE), c); }
static int is_cased(uint32_t c) { return in_ranges(CASED, COUNT(CASED), c); }
static int is_case_ignorable(uint32_t c) {
    return in_ranges(CASE_IGNORABLE, COUNT(CASE_IGNORABLE), c);
}

/* The value a sorted table of (code point, value) gives c, or absent. */
static uint32_t mapped(const uint32_t (*table)[2], int n, uint32_t c, uint32_t absent) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c < table[mid][0]) hi = mid - 1;
        else if (c > table[mid][0]) lo = mid + 1;
        else return table[mid][1];
    }
    return absent;
}

static uint32_t lower_of(uint32_t c) { return mapped(LOWER, COUNT(LOWER), c, c); }

/* str.lower()'s capital sigma: final (U+03C2) after a cased letter and
 * not before one, case-ignorable characters skipped (CPython's rule). */
static uint32_t lower_sigma(const uint32_t *s, long n, long i) {
    long j = i - 1;
    while (j >= 0 && is_case_ignorable(s[j])) j--;
    int final = j >= 0 && is_cased(s[j]);
    if (final) {
        j = i + 1;
        while (j < n && is_case_ignorable(s[j])) j++;
        final = j == n || !is_cased(s[j]);
    }
    return final ? 0x3c2 : 0x3c3;
}

/* ---- the classes the pre-tokenizer patterns read: \p{L}, \p{N}, \s and
 * the rest (unicode_tables.h: the regex engine's \s, Unicode's L and N) ---- */
enum { C_OTHER, C_LETTER, C_NUMBER, C_SPACE };

static int class_of(uint32_t c) {
    if (c < 0x80) {
        if ((c | 32) >= 'a' && (c | 32) <= 'z') return C_LETTER;
        if (c >= '0' && c <= '9') return C_NUMBER;
        return c == ' ' || (c >= '\t' && c <= '\r') ? C_SPACE : C_OTHER;
    }
    if (in_ranges(LETTER, COUNT(LETTER), c)) return C_LETTER;
    if (in_ranges(NUMBER, COUNT(NUMBER), c)) return C_NUMBER;
    return in_ranges(WHITE, COUNT(WHITE), c) ? C_SPACE : C_OTHER;
}

/* The class of the character at s[i], and in *next where the one after starts. */
static int class_at(const unsigned char *s, size_t i, size_t *next) {
    if (s[i] < 0x80) return *next = i + 1, class_of(s[i]);
    return class_of(next_cp(s, (*next = i, next)));
}

/* Where the run of characters of class c from s[i] ends. */
static size_t run_of(const unsigned char *s, size_t i, size_t n, int c) {
    size_t next;
    while (i < n && class_at(s, i, &next) == c) i = next;
    return i;
}

/* ---- NFC (unicode_tables.h: CCC, DECOMPOSED, COMPOSE, NFC_UNSAFE) ---- */
enum { HANGUL_S = 0xac00, HANGUL_L = 0x1100, HANGUL_V = 0x1161, HANGUL_T = 0x11a7,
       HANGUL_VS = 21, HANGUL_TS = 28, HANGUL_SYLLABLES = 11172 };

static int ccc_of(uint32_t c) { return (int)mapped(CCC, COUNT(CCC), c, 0); }

/* c's full canonical decomposition onto out (at most 4 code points); how many. */
static int decompose(uint32_t c, uint32_t *out) {
    if (c >= HANGUL_S && c < HANGUL_S + HANGUL_SYLLABLES) {
        uint32_t i = c - HANGUL_S, t = i % HANGUL_TS;
        out[0] = HANGUL_L + i / (HANGUL_VS * HANGUL_TS);
        out[1] = HANGUL_V + i % (HANGUL_VS * HANGUL_TS) / HANGUL_TS;
        if (t) out[2] = HANGUL_T + t;
        return t ? 3 : 2;
    }
    int lo = 0, hi = COUNT(DECOMPOSED) - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c < DECOMPOSED[mid][0]) hi = mid - 1;
        else if (c > DECOMPOSED[mid][0]) lo = mid + 1;
        else {
            memcpy(out, DECOMPOSITION + DECOMPOSED[mid][1], sizeof(uint32_t) * DECOMPOSED[mid][2]);
            return (int)DECOMPOSED[mid][2];
        }
    }
    return out[0] = c, 1;
}

/* The primary composite of a and b, or 0. */
static uint32_t compose(uint32_t a, uint32_t b) {
    if (a >= HANGUL_L && a < HANGUL_L + 19 && b >= HANGUL_V && b < HANGUL_V + HANGUL_VS)
        return HANGUL_S + ((a - HANGUL_L) * HANGUL_VS + b - HANGUL_V) * HANGUL_TS;
    if (a >= HANGUL_S && a < HANGUL_S + HANGUL_SYLLABLES && (a - HANGUL_S) % HANGUL_TS == 0 &&
        b > HANGUL_T && b < HANGUL_T + HANGUL_TS)
        return a + b - HANGUL_T;
    int lo = 0, hi = COUNT(COMPOSE) - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (a < COMPOSE[mid][0] || (a == COMPOSE[mid][0] && b < COMPOSE[mid][1])) hi = mid - 1;
        else if (a > COMPOSE[mid][0] || b > COMPOSE[mid][1]) lo = mid + 1;
        else return COMPOSE[mid][2];
    }
    return 0;
}

/* Unicode's algorithm as written: decompose, order the combining marks by
 * class (stably), compose each with the last starter it is not blocked
 * from. */
static int nfc_span(const unsigned char *s, size_t n, Buffer *out) {
    /* each code point with its class above it: (class << 21 | code point) */
    uint32_t *cp = malloc(sizeof(uint32_t) * (4 * n + 1));  /* at most 4 a character */
    uint32_t *sorted = malloc(sizeof(uint32_t) * (4 * n + 1));
    size_t m = 0;
    int status = -1;
    if (!cp || !sorted) goto done;
    for (size_t i = 0; i < n;) m += (size_t)decompose(next_cp(s, &i), cp + m);
    for (size_t k = 0; k < m; k++) cp[k] |= (uint32_t)ccc_of(cp[k]) << 21;
    /* each run of marks ordered by class, stably: a counting sort, linear
     * however long the run */
    for (size_t a = 0, b; a < m; a = b + 1) {
        for (b = a; b < m && cp[b] >> 21; b++) {}
        if (b - a < 2) continue;
        size_t at[257] = {0};
        for (size_t k = a; k < b; k++) at[(cp[k] >> 21) + 1]++;
        for (int c = 1; c < 257; c++) at[c] += at[c - 1];
        for (size_t k = a; k < b; k++) sorted[at[cp[k] >> 21]++] = cp[k];
        memcpy(cp + a, sorted, sizeof(uint32_t) * (b - a));
    }
    size_t kept = m ? 1 : 0, starter = 0;
    int last = m && cp[0] >> 21 ? 256 : 0;  /* a leading mark blocks */
    for (size_t k = 1; k < m; k++) {
        int c = (int)(cp[k] >> 21);
        uint32_t both = compose(cp[starter] & 0x1fffff, cp[k] & 0x1fffff);
        if (both && (last < c || last == 0)) {
            cp[starter] = both;  /* a composite is a starter (class 0) */
            continue;
        }
        if (!c) starter = kept;
        last = c;
        cp[kept++] = cp[k];
    }
    status = 0;
    for (size_t k = 0; k < kept && !status; k++) status = put_cp(out, cp[k] & 0x1fffff);
done:
    free(cp), free(sorted);
    return status;
}

/* Whether the character at s[i] may change under NFC or change what comes
 * before it (NFC_UNSAFE), and in *next where the one after starts. */
static int unsafe_at(const unsigned char *s, size_t i, size_t *next) {
    if (s[i] < 0x80) return *next = i + 1, 0;
    return in_ranges(NFC_UNSAFE, COUNT(NFC_UNSAFE), next_cp(s, (*next = i, next)));
}

/* NFC is the same cut before any safe character (a starter nothing
 * composes onto and none reorders across): the text is copied, and only
 * the spans from the safe character before an unsafe one to the next safe
 * one go through nfc_span. */
int nfc(const unsigned char *s, size_t n, Buffer *out) {
    size_t done = 0, safe = 0, next;
    for (size_t i = 0; i < n;) {
        if (!unsafe_at(s, i, &next)) {
            safe = i, i = next;
            continue;
        }
        size_t start = safe > done ? safe : done;
        while (next < n && unsafe_at(s, next, &i)) next = i;
        if (buf_add(out, s + done, start - done) || nfc_span(s + start, next - start, out))
            return -1;
        done = i = next;
    }
    return buf_add(out, s + done, n - done);
}

/* ---- hashing ---- */
static uint64_t hash_bytes(const unsigned char *s, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ULL;
    return h;
}

static uint64_t hash_pair(int a, int b) {
    uint64_t z = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* An open-addressing table for n entries, every slot empty (-1); its
 * size (a power of two) in *cap. */
static int *empty_slots(int n, int *cap) {
    *cap = 16;
    while (*cap < 2 * n) *cap *= 2;
    int *slots = malloc(sizeof(int) * (size_t)*cap);
    if (slots) memset(slots, 0xff, sizeof(int) * (size_t)*cap);
    return slots;
}

int tok_find(const Tokenizer *t, const unsigned char *w, size_t n) {
    for (uint64_t h = hash_bytes(w, n) & (t->id_cap - 1);; h = (h + 1) & (t->id_cap - 1)) {
        int id = t->id_slots[h];
        if (id < 0) return -1;
        if ((size_t)t->key_len[id] == n && !memcmp(t->key[id], w, n)) return id;
    }
}

static int find_merge(const Tokenizer *t, int left, int right) {
    for (uint64_t h = hash_pair(left, right) & (t->merge_cap - 1);;
         h = (h + 1) & (t->merge_cap - 1)) {
        int m = t->merge_slots[h];
        if (m < 0) return -1;
        if (t->merges[m].left == left && t->merges[m].right == right) return m;
    }
}

static int words_of(const Tokenizer *t, const char *text, size_t len, Buffer *words, Ids *ends);

/* Specials without bytes, every other id with them: at each kind's fixed
 * ids (check_specials), or for hf its added tokens; each id's key distinct. */
const char *tok_index(Tokenizer *t) {
    int specials = t->kind == TOK_WORD ? 2 : 4;
    if (t->kind != TOK_HF && t->n_ids < specials + 1) return "too few ids for its kind";
    for (int i = 0; i < t->n_ids && t->kind != TOK_HF; i++) {
        int special = t->kind == TOK_WORD ? i == 0 || i == t->n_ids - 1 : i < 4;
        if (special != !t->raw[i]) return "a special id has bytes, or a token has none";
    }
    if (!t->key) t->key = t->raw, t->key_len = t->raw_len;
    if (!(t->id_slots = empty_slots(t->n_ids, &t->id_cap))) return "out of memory";
    for (int i = 0; i < t->n_ids; i++) {
        if (!t->key[i]) continue;
        if (tok_find(t, t->key[i], (size_t)t->key_len[i]) >= 0)
            return "two tokens have the same bytes";
        uint64_t h = hash_bytes(t->key[i], (size_t)t->key_len[i]) & (t->id_cap - 1);
        while (t->id_slots[h] >= 0) h = (h + 1) & (t->id_cap - 1);
        t->id_slots[h] = i;
    }
    return 0;
}

/* Merges in rank order, each making the token whose key is left's then
 * right's, no pair twice. bpe: pairs of non-special ids, each of bytes or
 * an earlier merge's token, the vocabulary the bytes and the merges'
 * tokens (bpe._check_merges). */
static const char *check_merges(Tokenizer *t) {
    unsigned char *live = calloc((size_t)t->n_ids, 1);
    Buffer joined = {0};
    const char *problem = 0;
    int own = t->kind == TOK_BPE;
    if (!live) return "out of memory";
    for (int b = 0; b < 256; b++) live[t->byte_id[b]] = 1;
    if (!(t->merge_slots = empty_slots(t->n_merges, &t->merge_cap)) ||
        !(t->walls = malloc((size_t)t->n_ids)))
        problem = "out of memory";
    else memset(t->walls, 1, (size_t)t->n_ids);
    for (int r = 0; r < t->n_merges && !problem; r++) {
        Merge *m = &t->merges[r];
        if (own && (m->left < 4 || m->right < 4 || !live[m->left] || !live[m->right])) {
            problem = "a merge uses a token no earlier merge makes";
            break;
        }
        joined.n = 0;
        if (!t->key[m->left] || !t->key[m->right]) {
            problem = "a merge names an added token";
            break;
        }
        if (buf_add(&joined, t->key[m->left], (size_t)t->key_len[m->left]) ||
            buf_add(&joined, t->key[m->right], (size_t)t->key_len[m->right])) {
            problem = "out of memory";
            break;
        }
        m->result = tok_find(t, (unsigned char *)joined.bytes, joined.n);
        if (m->result < 0) problem = "a merge makes a token that is not in the vocabulary";
        else if (find_merge(t, m->left, m->right) >= 0) problem = "a merge appears twice";
        else {
            uint64_t h = hash_pair(m->left, m->right) & (t->merge_cap - 1);
            while (t->merge_slots[h] >= 0) h = (h + 1) & (t->merge_cap - 1);
            t->merge_slots[h] = r;
            live[m->result] = 1;
            t->walls[m->left] = t->walls[m->right] = 0;
        }
    }
    for (int i = 4; own && i < t->n_ids && !problem; i++)
        if (!live[i]) problem = "a token is neither a byte nor made by a merge";
    free(live);
    buf_free(&joined);
    return problem;
}

/* Each byte's id: the token of that one byte, or for sentencepiece its
 * byte-fallback token <0xXX>. */
static const char *byte_ids(Tokenizer *t) {
    for (int b = 0; b < 256; b++) {
        char fallback[8];
        snprintf(fallback, sizeof(fallback), "<0x%02X>", b);
        unsigned char one = (unsigned char)b;
        t->byte_id[b] = t->kind == TOK_HF && t->shape == SHAPE_SENTENCEPIECE
                            ? tok_find(t, (unsigned char *)fallback, 6) : tok_find(t, &one, 1);
        if (t->byte_id[b] < 0 && t->kind != TOK_WORD && t->kind != TOK_CHAR)
            return t->kind == TOK_HF && t->shape == SHAPE_SENTENCEPIECE
                       ? "the tokenizer lacks a byte-fallback token <0xXX>"
                       : "the tokenizer lacks a token for a single byte";
    }
    return 0;
}

const char *tok_prepare(Tokenizer *t) {
    const char *problem = t->id_slots ? 0 : tok_index(t);
    if (problem || (problem = byte_ids(t))) return problem;
    if (t->kind == TOK_BYTE) {  /* exactly the specials, then byte b at 4 + b */
        if (t->n_ids != 260) return "the byte tokenizer has other than 260 ids";
        for (int b = 0; b < 256; b++)
            if (t->byte_id[b] != 4 + b) return "the byte tokenizer's ids are out of order";
    }
    if (t->kind == TOK_BPE || t->kind == TOK_HF) {
        if ((problem = check_merges(t))) return problem;
        /* every added token's first byte, where any is matched in text (a
         * special one found there is skipped whole) */
        int matched = 0;
        for (int a = 0; a < t->n_added; a++) matched |= !t->added[a].special;
        for (int a = 0; matched && a < t->n_added; a++) t->added_first[t->added[a].text[0]] = 1;
    }
    if (t->kind == TOK_CHAR) {  /* single characters in code-point order */
        t->n_chars = t->n_ids - 4;
        t->char_cp = malloc(sizeof(uint32_t) * (size_t)t->n_chars);
        if (!t->char_cp) return "out of memory";
        for (int i = 0; i < t->n_chars; i++) {
            const unsigned char *raw = t->raw[4 + i];
            int valid, len = t->raw_len[4 + i];
            size_t at = 0;
            if (utf8_char(raw, (size_t)len, 0, &valid) != len)
                return "a char token is not one character";
            t->char_cp[i] = next_cp(raw, &at);
            if (i && t->char_cp[i] <= t->char_cp[i - 1])
                return "the char tokens are not in code-point order";
        }
    }
    if (t->kind == TOK_WORD) {  /* each a word as words_of writes it */
        Buffer words = {0};
        Ids ends = {0};
        for (int i = 1; i < t->n_ids - 1 && !problem; i++) {
            words.n = 0, ends.n = 0;
            if (!utf8_valid((const char *)t->raw[i], (size_t)t->raw_len[i]))
                problem = "a word is not UTF-8";
            else if (words_of(t, (const char *)t->raw[i], (size_t)t->raw_len[i], &words, &ends))
                problem = "out of memory";
            else if (ends.n != 1 || words.n != (size_t)t->raw_len[i] ||
                     memcmp(words.bytes, t->raw[i], words.n))
                problem = "a word is not one as the word tokenizer writes them";
        }
        buf_free(&words);
        ids_free(&ends);
    }
    return problem;
}

void tok_free(Tokenizer *t) {
    for (int i = 0; i < t->n_ids; i++) {
        if (t->raw) free(t->raw[i]);
        if (t->key && t->key != t->raw) free(t->key[i]);
        if (t->name) free(t->name[i]);
    }
    if (t->key != t->raw) free(t->key), free(t->key_len);
    for (int a = 0; a < t->n_added; a++) free(t->added[a].text);
    free(t->raw);
    free(t->raw_len);
    free(t->name);
    free(t->added);
    free(t->char_cp);
    free(t->merges);
    free(t->merge_slots);
    free(t->walls);
    free(t->id_slots);
    memset(t, 0, sizeof(*t));
}

/* ---- encoders ---- */
static int encode_char(const Tokenizer *t, const char *text, size_t len, Ids *out) {
    for (size_t i = 0; i < len;) {
        uint32_t c = next_cp((const unsigned char *)text, &i);
        int lo = 0, hi = t->n_chars - 1, id = t->unk_id;
        while (lo <= hi) {
            int mid = (lo + hi) / 2;
            if (c < t->char_cp[mid]) hi = mid - 1;
            else if (c > t->char_cp[mid]) lo = mid + 1;
            else {
                id = 4 + mid;
                break;
            }
        }
        if (ids_push(out, id)) return -1;
    }
    return 0;
}

static int encode_byte(const Tokenizer *t, const char *text, size_t len, Ids *out) {
    for (size_t i = 0; i < len; i++)
        if (ids_push(out, t->byte_id[(unsigned char)text[i]])) return -1;
    return 0;
}

/* One BPE piece: its symbols' ids (bytes; for sentencepiece characters, or
 * a character's byte-fallback tokens where it has no token), then the
 * lowest-rank merge (leftmost of equals) applied while any adjacent pair
 * has one. The candidates sit in a min-heap by (rank, position), the
 * tokens in a linked list, so a piece of n symbols takes O(n log n), as in
 * the tokenizers library; a candidate is stale, as there, when the pair at
 * its place no longer makes its token. With ignore_merges a piece that is
 * a token is that token. */
typedef struct { int rank, at; } Candidate;

static void heap_push(Candidate *heap, int *n, Candidate c) {
    int i = (*n)++;
    while (i && (heap[(i - 1) / 2].rank > c.rank ||
                 (heap[(i - 1) / 2].rank == c.rank && heap[(i - 1) / 2].at > c.at))) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = c;
}

static Candidate heap_pop(Candidate *heap, int *n) {
    Candidate top = heap[0], last = heap[--*n];
    int i = 0;
    for (;;) {
        int child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && (heap[child + 1].rank < heap[child].rank ||
                               (heap[child + 1].rank == heap[child].rank &&
                                heap[child + 1].at < heap[child].at)))
            child++;
        if (heap[child].rank > last.rank || (heap[child].rank == last.rank &&
                                             heap[child].at > last.at))
            break;
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = last;
    return top;
}

/* The piece's symbols into token (n at most its bytes); how many. */
static int symbols(const Tokenizer *t, const unsigned char *s, size_t n, int *token) {
    int k = 0;
    if (t->kind != TOK_HF || t->shape != SHAPE_SENTENCEPIECE) {
        for (size_t i = 0; i < n; i++) token[k++] = t->byte_id[s[i]];
        return k;
    }
    for (size_t i = 0; i < n;) {
        size_t at = i;
        next_cp(s, &i);
        int id = tok_find(t, s + at, i - at);
        if (id >= 0) token[k++] = id;
        else
            while (at < i) token[k++] = t->byte_id[s[at++]];
    }
    return k;
}

/* BPE on the symbols token[a..b): their merges, then their ids onto out. */
static int merge_run(const Tokenizer *t, int *token, int *next, int *prev, Candidate *heap,
                     int a, int b, Ids *out) {
    int size = 0, status = 0;
    for (int i = a; i < b; i++) next[i] = i + 1 < b ? i + 1 : -1, prev[i] = i - 1;
    prev[a] = -1;
    for (int i = a; i + 1 < b; i++) {
        int m = find_merge(t, token[i], token[i + 1]);
        if (m >= 0) heap_push(heap, &size, (Candidate){m, i});
    }
    while (size) {
        Candidate c = heap_pop(heap, &size);
        int at = c.at, right = next[at], m;
        /* stale: at was merged away (token -1), or its pair makes another token */
        if (token[at] < 0 || right < 0 || (m = find_merge(t, token[at], token[right])) < 0 ||
            t->merges[m].result != t->merges[c.rank].result)
            continue;
        token[at] = t->merges[c.rank].result;
        token[right] = -1;
        next[at] = next[right];
        if (next[right] >= 0) prev[next[right]] = at;
        if (prev[at] >= 0 && (m = find_merge(t, token[prev[at]], token[at])) >= 0)
            heap_push(heap, &size, (Candidate){m, prev[at]});
        if (next[at] >= 0 && (m = find_merge(t, token[at], token[next[at]])) >= 0)
            heap_push(heap, &size, (Candidate){m, at});
    }
    for (int i = a; i >= 0 && !status; i = next[i]) status = ids_push(out, token[i]);
    return status;
}

static int encode_piece(const Tokenizer *t, const unsigned char *s, size_t n, Ids *out) {
    int whole = t->ignore_merges ? tok_find(t, s, n) : -1;
    if (whole >= 0) return ids_push(out, whole);
    /* a word's symbols fit on the stack; a longer piece's are allocated */
    enum { SHORT = 64 };
    int short_token[SHORT], short_next[SHORT], short_prev[SHORT];
    Candidate short_heap[3 * SHORT + 1];
    int on_stack = n <= SHORT;
    int *token = on_stack ? short_token : malloc(sizeof(int) * n);
    int *next = on_stack ? short_next : malloc(sizeof(int) * n);
    int *prev = on_stack ? short_prev : malloc(sizeof(int) * n);
    /* each merge adds at most two candidates to the n - 1 first ones */
    Candidate *heap = on_stack ? short_heap : malloc(sizeof(Candidate) * (3 * n + 1));
    int status = -1;
    if (!token || !next || !prev || !heap) goto done;
    int k = symbols(t, s, n, token);
    /* a symbol no merge takes (a newline's byte-fallback token) is a wall no
     * merge crosses: the runs between walls merge alone, in small heaps,
     * as they would in one */
    status = 0;
    for (int a = 0, b; a < k && !status; a = b) {
        for (b = a + 1; b < k && !t->walls[token[a]] && !t->walls[token[b]]; b++) {}
        status = merge_run(t, token, next, prev, heap, a, b, out);
    }
done:
    if (!on_stack) free(token), free(next), free(prev), free(heap);
    return status;
}

/* ---- pre-tokenizer patterns (contract.PRETOKENIZER_PATTERNS): each
 * pattern's alternatives tried in order at s[i], each greedy and
 * backtracking as the regex engine does; the end of the match, or i ---- */

/* A contraction 's 't 're 've 'm 'll 'd after the apostrophe at s[i - 1]
 * (any case: with ſ, which folds to s); its end, or 0. */
static size_t contraction(const unsigned char *s, size_t i, size_t n, int any_case) {
    static const char *const ENDS[] = {"s", "t", "re", "ve", "m", "ll", "d"};
    if (any_case && i + 1 < n && s[i] == 0xc5 && s[i + 1] == 0xbf) return i + 2;
    for (int k = 0; k < 7; k++) {
        size_t len = strlen(ENDS[k]), j = 0;
        while (j < len && i + j < n &&
               (s[i + j] == ENDS[k][j] || (any_case && (s[i + j] | 32) == ENDS[k][j])))
            j++;
        if (j == len) return i + len;
    }
    return 0;
}

/* \s+(?!\S)|\s+ at whitespace s[i]: the run but its last character where
 * something follows it (that one starts the next piece), or all of it. */
static size_t spaces(const unsigned char *s, size_t i, size_t n) {
    size_t end = run_of(s, i, n, C_SPACE), last = end;
    if (end == n) return end;
    do last--; while ((s[last] & 0xc0) == 0x80);
    return last > i ? last : end;
}

/* gpt-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t match_gpt2(const unsigned char *s, size_t i, size_t n) {
    size_t end, next, after;
    if (s[i] == '\'' && (end = contraction(s, i + 1, n, 0))) return end;
    int c = class_at(s, i, &next), d;
    if (s[i] == ' ' && next < n && (d = class_at(s, next, &after)) != C_SPACE)
        return run_of(s, after, n, d);
    return c == C_SPACE ? spaces(s, i, n) : run_of(s, next, n, c);
}

/* llama-3 and qwen2 (digits at most 3 or 1 in a piece):
 * (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 * ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static size_t match_llama3(const unsigned char *s, size_t i, size_t n, int digits) {
    size_t end, next, after;
    if (s[i] == '\'' && (end = contraction(s, i + 1, n, 1))) return end;
    int c = class_at(s, i, &next);
    if (c == C_LETTER) return run_of(s, next, n, C_LETTER);
    if (c != C_NUMBER && s[i] != '\r' && s[i] != '\n' && next < n &&
        class_at(s, next, &after) == C_LETTER)
        return run_of(s, after, n, C_LETTER);
    if (c == C_NUMBER) {
        for (end = next; --digits > 0 && end < n && class_at(s, end, &after) == C_NUMBER;)
            end = after;
        return end;
    }
    size_t other = s[i] == ' ' ? next : i;
    if (other < n && class_at(s, other, &after) == C_OTHER) {
        end = run_of(s, after, n, C_OTHER);
        while (end < n && (s[end] == '\r' || s[end] == '\n')) end++;
        return end;
    }
    if (c != C_SPACE) return i;
    for (end = run_of(s, i, n, C_SPACE); end > i; end--)  /* through its last \r or \n */
        if (s[end - 1] == '\r' || s[end - 1] == '\n') return end;
    return spaces(s, i, n);
}

static int bpe_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == 0x0b || c == 0x0c || c == '\r';
}

/* sqlgpt: ?[^ \t\n\x0b\x0c\r]+| +(?![^ \t\n\x0b\x0c\r])|[\t\n\x0b\x0c\r]
 * (sqlgpt/data/tokenizers/bpe.py, rule 2: bytes, ASCII whitespace) */
static size_t match_sqlgpt(const unsigned char *s, size_t i, size_t n) {
    size_t j = i;
    if (!bpe_space(s[i]) || (s[i] == ' ' && i + 1 < n && !bpe_space(s[i + 1]))) {
        j = i + 1;  /* a word, or a space and the word after it */
        while (j < n && !bpe_space(s[j])) j++;
    } else if (s[i] == ' ') {
        while (j < n && s[j] == ' ') j++;
        if (j < n && !bpe_space(s[j]) && j - i > 1) j--;  /* the last starts the word */
    } else j = i + 1;
    return j;
}

/* The end of step's piece at s[i], or i where it matches nothing there. */
static size_t cut(int step, const unsigned char *s, size_t i, size_t n) {
    size_t next;
    switch (step) {
    case PATTERN_GPT_2: return match_gpt2(s, i, n);
    case PATTERN_LLAMA_3: return match_llama3(s, i, n, 3);
    case PATTERN_QWEN2: return match_llama3(s, i, n, 1);
    case PATTERN_SQLGPT: return match_sqlgpt(s, i, n);
    case STEP_DIGIT: return class_at(s, i, &next) == C_NUMBER ? next : i;
    default: return run_of(s, i, n, C_NUMBER);  /* STEP_DIGITS */
    }
}

/* The pre-tokenizer's steps from step on s (n bytes), each piece's BPE
 * ids onto out: a step's matches are pieces, and so is the text between
 * them ("isolated"); ByteLevel's prefix space goes before a piece that
 * does not start with one. */
static int pre_tokenize(const Tokenizer *t, int step, const unsigned char *s, size_t n,
                        Ids *out) {
    if (!n) return 0;
    if (step == t->n_steps) return encode_piece(t, s, n, out);
    if (t->steps[step] == STEP_PREFIX_SPACE) {
        if (s[0] == ' ') return pre_tokenize(t, step + 1, s, n, out);
        unsigned char *spaced = malloc(n + 1);
        if (!spaced) return -1;
        spaced[0] = ' ';
        memcpy(spaced + 1, s, n);
        int status = pre_tokenize(t, step + 1, spaced, n + 1, out);
        free(spaced);
        return status;
    }
    size_t gap = 0;
    for (size_t i = 0; i < n;) {
        size_t end = cut(t->steps[step], s, i, n);
        if (end == i) {
            i += s[i] < 0x80 ? 1 : s[i] < 0xe0 ? 2 : s[i] < 0xf0 ? 3 : 4;
            continue;
        }
        if ((i > gap && pre_tokenize(t, step + 1, s + gap, i - gap, out)) ||
            pre_tokenize(t, step + 1, s + i, end - i, out))
            return -1;
        gap = i = end;
    }
    return pre_tokenize(t, step + 1, s + gap, n - gap, out);
}

/* ---- an imported (hf) tokenizer: added tokens, then the normalizer,
 * then the pre-tokenizer and BPE, as the tokenizers library runs them ---- */
static int added_split(const Tokenizer *t, int normalized, const unsigned char *s, size_t n,
                       Ids *out);

/* A part of the text between added tokens (the text's first part: at_start):
 * normalized (NFC, or for sentencepiece spaces as "\u2581" and one before)
 * and cut again by the normalized added tokens; then pre-tokenized. */
static int text_part(const Tokenizer *t, int normalized, const unsigned char *s, size_t n,
                     int at_start, Ids *out) {
    static const unsigned char SPM_SPACE[] = "\xe2\x96\x81";
    if (!n) return 0;
    if (normalized) return pre_tokenize(t, 0, s, n, out);
    Buffer b = {0};
    int status = 0;
    if (t->shape == SHAPE_SENTENCEPIECE) {
        int there = s[0] == ' ' || (n >= 3 && !memcmp(s, SPM_SPACE, 3));
        if (t->prepend == PREPEND_ALWAYS ||
            (!there && (t->prepend == PREPEND_UNLESS_THERE ||
                        (t->prepend == PREPEND_FIRST_UNLESS_THERE && at_start))))
            status = buf_add(&b, SPM_SPACE, 3);
        for (size_t i = 0; i < n && !status; i++)
            status = s[i] == ' ' ? buf_add(&b, SPM_SPACE, 3) : buf_add(&b, s + i, 1);
    } else status = t->nfc ? nfc(s, n, &b) : buf_add(&b, s, n);
    if (!status) status = added_split(t, 1, (unsigned char *)b.bytes, b.n, out);
    buf_free(&b);
    return status;
}

/* The added tokens of one kind (normalized or not) found in s, leftmost
 * and longest first, as the library's matcher finds them: a special one
 * found is skipped and stays text (encode never gives a special); the
 * others are their ids, and the text between them text_part's. */
static int added_split(const Tokenizer *t, int normalized, const unsigned char *s, size_t n,
                       Ids *out) {
    size_t start = 0, i = 0;
    while (i < n) {
        int found = -1;
        for (int a = 0; t->added_first[s[i]] && a < t->n_added; a++) {
            const Added *x = &t->added[a];
            if (x->normalized == normalized && (size_t)x->len <= n - i &&
                (found < 0 || x->len > t->added[found].len) &&
                !memcmp(s + i, x->text, (size_t)x->len))
                found = a;
        }
        if (found < 0) {
            i++;
            continue;
        }
        if (!t->added[found].special) {
            if (text_part(t, normalized, s + start, i - start, start == 0, out) ||
                ids_push(out, t->added[found].id))
                return -1;
            start = i + (size_t)t->added[found].len;
        }
        i += (size_t)t->added[found].len;
    }
    return text_part(t, normalized, s + start, n - start, start == 0, out);
}

/* The original's words (word.words_of): every character that is neither
 * alphanumeric nor whitespace deleted ("_" too), lower-cased, split on
 * whitespace; their bytes one after another into words, where each ends
 * into ends. */
static int words_of(const Tokenizer *t, const char *text, size_t len, Buffer *words, Ids *ends) {
    (void)t;
    uint32_t *kept = malloc(sizeof(uint32_t) * (len ? len : 1));
    if (!kept) return -1;
    long n = 0;
    for (size_t i = 0; i < len;) {
        uint32_t c = next_cp((const unsigned char *)text, &i);
        if ((is_alnum(c) || is_space(c)) && c != '_') kept[n++] = c;
    }
    int status = 0;
    size_t start = words->n;
    for (long i = 0; i <= n && !status; i++) {
        if (i == n || is_space(kept[i])) {
            if (words->n > start) status = ids_push(ends, (int)words->n);
            start = words->n;
            continue;
        }
        uint32_t c = kept[i];
        if (c == 0x3a3) status = put_cp(words, lower_sigma(kept, n, i));
        else if (c == 0x130) status = put_cp(words, 'i') || put_cp(words, 0x307);
        else status = put_cp(words, lower_of(c));
    }
    free(kept);
    return status;
}

static int encode_word(const Tokenizer *t, const char *text, size_t len, Ids *out) {
    Buffer words = {0};
    Ids ends = {0};
    int status = words_of(t, text, len, &words, &ends);
    for (int w = 0, start = 0; w < ends.n && !status; start = ends.ids[w++]) {
        int id = tok_find(t, (unsigned char *)words.bytes + start, (size_t)(ends.ids[w] - start));
        status = ids_push(out, id >= 0 ? id : t->unk_id);
    }
    buf_free(&words);
    ids_free(&ends);
    return status;
}

int tok_encode(const Tokenizer *t, const char *text, size_t len, Ids *out) {
    const unsigned char *s = (const unsigned char *)text;
    switch (t->kind) {
    case TOK_CHAR: return encode_char(t, text, len, out);
    case TOK_BYTE: return encode_byte(t, text, len, out);
    case TOK_BPE: return pre_tokenize(t, 0, s, len, out);
    case TOK_HF: return added_split(t, 0, s, len, out);
    default: return encode_word(t, text, len, out);
    }
}
int tok_decode(const Tokenizer *t, const int *ids, int n, Buffer *out) {
    static const char UNK_WORD[] = "<unk>", REPLACEMENT[] = "\xef\xbf\xbd";
    if (t->kind == TOK_WORD) {  /* words joined by single spaces; <pad> dropped */
        int first = 1;
        for (int i = 0; i < n; i++) {
            if (ids[i] == t->pad_id) continue;
            if (!first && buf_add(out, " ", 1)) return -1;
            first = 0;
            if (ids[i] == t->unk_id ? buf_add(out, UNK_WORD, 5)
                                    : buf_add(out, t->raw[ids[i]], (size_t)t->raw_len[ids[i]]))
                return -1;
        }
        return buf_add(out, "", 0);
    }
    Buffer raw = {0};
    int status = 0;
    for (int i = 0; i < n && !status; i++) {
        int id = ids[i];
        if (id == t->unk_id) status = buf_add(&raw, REPLACEMENT, 3);
        else if (t->raw[id]) status = buf_add(&raw, t->raw[id], (size_t)t->raw_len[id]);
    }
    if (!status) status = decode_replace((const unsigned char *)raw.bytes, raw.n, out);
    buf_free(&raw);
    return status;
}
