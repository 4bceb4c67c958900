/* Tokenizers in C, encoding to the ids the Python package gives (the rules
 * are stated in sqlgpt/tokenizers/): word (the original's sanitizing over
 * Unicode, with tables generated from Python's own Unicode database at
 * build time), char, byte, and byte-level BPE. Decoding joins the ids'
 * bytes and replaces invalid UTF-8 as Python's "replace" does. */
#include <stdlib.h>
#include <string.h>
#include "ext.h"
#include "unicode_tables.h"

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

static uint32_t lower_of(uint32_t c) {
    int lo = 0, hi = COUNT(LOWER) - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c < LOWER[mid][0]) hi = mid - 1;
        else if (c > LOWER[mid][0]) lo = mid + 1;
        else return LOWER[mid][1];
    }
    return c;
}

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

static int find_word(const Tokenizer *t, const unsigned char *w, size_t n) {
    for (uint64_t h = hash_bytes(w, n) & (t->word_cap - 1);; h = (h + 1) & (t->word_cap - 1)) {
        int id = t->word_slots[h];
        if (id < 0) return -1;
        if ((size_t)t->raw_len[id] == n && !memcmp(t->raw[id], w, n)) return id;
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

const char *tok_prepare(Tokenizer *t) {
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    for (int i = 0; i < t->n_ids; i++)
        if (t->raw[i] && t->raw_len[i] == 1 && t->kind != TOK_WORD) t->byte_id[t->raw[i][0]] = i;
    if (t->kind == TOK_BYTE || t->kind == TOK_BPE)
        for (int b = 0; b < 256; b++)
            if (t->byte_id[b] < 0) return "the tokenizer lacks a token for a single byte";
    if (t->kind == TOK_CHAR) {
        t->n_chars = t->n_ids - 4;
        t->char_cp = malloc(sizeof(uint32_t) * (size_t)(t->n_chars > 0 ? t->n_chars : 1));
        if (!t->char_cp) return "out of memory";
        for (int i = 0; i < t->n_chars; i++) {
            size_t at = 0;
            const unsigned char *raw = t->raw[4 + i];
            if (!raw) return "a char token has no bytes";
            t->char_cp[i] = next_cp(raw, &at);
            if ((int)at != t->raw_len[4 + i] || (i && t->char_cp[i] <= t->char_cp[i - 1]))
                return "the char tokens are not single characters in code-point order";
        }
    }
    if (t->kind == TOK_WORD) {
        if (!(t->word_slots = empty_slots(t->n_ids, &t->word_cap))) return "out of memory";
        for (int i = 0; i < t->n_ids; i++) {
            if (!t->raw[i]) continue;
            uint64_t h = hash_bytes(t->raw[i], (size_t)t->raw_len[i]) & (t->word_cap - 1);
            while (t->word_slots[h] >= 0) h = (h + 1) & (t->word_cap - 1);
            t->word_slots[h] = i;
        }
    }
    if (t->kind == TOK_BPE) {
        if (!(t->merge_slots = empty_slots(t->n_merges, &t->merge_cap))) return "out of memory";
        for (int m = 0; m < t->n_merges; m++) {
            uint64_t h = hash_pair(t->merges[m].left, t->merges[m].right) & (t->merge_cap - 1);
            while (t->merge_slots[h] >= 0) {
                if (t->merges[t->merge_slots[h]].left == t->merges[m].left &&
                    t->merges[t->merge_slots[h]].right == t->merges[m].right)
                    return "the BPE merges list a pair twice";
                h = (h + 1) & (t->merge_cap - 1);
            }
            t->merge_slots[h] = m;
        }
    }
    return 0;
}

void tok_free(Tokenizer *t) {
    if (t->raw)
        for (int i = 0; i < t->n_ids; i++) free(t->raw[i]);
    free(t->raw);
    free(t->raw_len);
    free(t->char_cp);
    free(t->merges);
    free(t->merge_slots);
    free(t->word_slots);
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

/* One BPE piece: its bytes' ids, then the lowest-rank merge (leftmost of
 * equals) applied while any adjacent pair has one. */
static int encode_piece(const Tokenizer *t, const unsigned char *s, size_t n, Ids *out) {
    int *tokens = malloc(sizeof(int) * (n ? n : 1));
    if (!tokens) return -1;
    size_t count = n;
    for (size_t i = 0; i < n; i++) tokens[i] = t->byte_id[s[i]];
    while (count > 1) {
        int best = -1;
        size_t at = 0;
        for (size_t i = 0; i + 1 < count; i++) {
            int m = find_merge(t, tokens[i], tokens[i + 1]);
            if (m >= 0 && (best < 0 || m < best)) best = m, at = i;
        }
        if (best < 0) break;
        tokens[at] = t->merges[best].result;
        memmove(tokens + at + 1, tokens + at + 2, sizeof(int) * (count - at - 2));
        count--;
    }
    int status = 0;
    for (size_t i = 0; i < count && !status; i++) status = ids_push(out, tokens[i]);
    free(tokens);
    return status;
}

static int bpe_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == 0x0b || c == 0x0c || c == '\r';
}

/* The pieces of sqlgpt's pre-tokenization (sqlgpt/tokenizers/bpe.py, rule 2). */
static int encode_bpe(const Tokenizer *t, const char *text, size_t len, Ids *out) {
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0;
    while (i < len) {
        size_t j = i;
        if (!bpe_space(s[i]) || (s[i] == ' ' && i + 1 < len && !bpe_space(s[i + 1]))) {
            j = i + 1;  /* a word, or a space and the word after it */
            while (j < len && !bpe_space(s[j])) j++;
        } else if (s[i] == ' ') {
            while (j < len && s[j] == ' ') j++;
            if (j < len && !bpe_space(s[j]) && j - i > 1) j--;  /* the last starts the word */
        } else j = i + 1;
        if (encode_piece(t, s + i, j - i, out)) return -1;
        i = j;
    }
    return 0;
}

/* The original's words: every character that is neither alphanumeric nor
 * whitespace deleted ("_" too), lower-cased, split on whitespace. */
static int encode_word(const Tokenizer *t, const char *text, size_t len, Ids *out) {
    uint32_t *kept = malloc(sizeof(uint32_t) * (len ? len : 1));
    Buffer word = {0};
    if (!kept) return -1;
    long n = 0;
    for (size_t i = 0; i < len;) {
        uint32_t c = next_cp((const unsigned char *)text, &i);
        if ((is_alnum(c) || is_space(c)) && c != '_') kept[n++] = c;
    }
    int status = 0;
    for (long i = 0; i <= n && !status; i++) {
        if (i == n || is_space(kept[i])) {
            if (word.n) {
                int id = find_word(t, (unsigned char *)word.bytes, word.n);
                status = ids_push(out, id >= 0 ? id : t->unk_id);
                word.n = 0;
            }
            continue;
        }
        uint32_t c = kept[i];
        if (c == 0x3a3) status = put_cp(&word, lower_sigma(kept, n, i));
        else if (c == 0x130) status = put_cp(&word, 'i') || put_cp(&word, 0x307);
        else status = put_cp(&word, lower_of(c));
    }
    free(kept);
    buf_free(&word);
    return status;
}

int tok_encode(const Tokenizer *t, const char *text, size_t len, Ids *out) {
    switch (t->kind) {
    case TOK_CHAR: return encode_char(t, text, len, out);
    case TOK_BYTE: return encode_byte(t, text, len, out);
    case TOK_BPE: return encode_bpe(t, text, len, out);
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
