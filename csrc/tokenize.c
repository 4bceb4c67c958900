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

/* The id whose bytes are w (n bytes), or -1. */
static int find_bytes(const Tokenizer *t, const unsigned char *w, size_t n) {
    for (uint64_t h = hash_bytes(w, n) & (t->id_cap - 1);; h = (h + 1) & (t->id_cap - 1)) {
        int id = t->id_slots[h];
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

static int words_of(const Tokenizer *t, const char *text, size_t len, Buffer *words, Ids *ends);

/* The specials each kind has at its fixed ids, with no bytes; every other
 * id with bytes, each id's distinct (check_specials). */
static const char *check_table(Tokenizer *t) {
    int specials = t->kind == TOK_WORD ? 2 : 4;
    if (t->n_ids < specials + 1) return "too few ids for its kind";
    for (int i = 0; i < t->n_ids; i++) {
        int special = t->kind == TOK_WORD ? i == 0 || i == t->n_ids - 1 : i < 4;
        if (special != !t->raw[i]) return "a special id has bytes, or a token has none";
    }
    if (!(t->id_slots = empty_slots(t->n_ids, &t->id_cap))) return "out of memory";
    for (int i = 0; i < t->n_ids; i++) {
        if (!t->raw[i]) continue;
        if (find_bytes(t, t->raw[i], (size_t)t->raw_len[i]) >= 0) return "two tokens have the same bytes";
        uint64_t h = hash_bytes(t->raw[i], (size_t)t->raw_len[i]) & (t->id_cap - 1);
        while (t->id_slots[h] >= 0) h = (h + 1) & (t->id_cap - 1);
        t->id_slots[h] = i;
    }
    return 0;
}

/* bpe: pairs of non-special ids in rank order, each of bytes or an
 * earlier merge's token, making a token of the vocabulary; the
 * vocabulary is the bytes and the merges' tokens (bpe._check_merges). */
static const char *check_merges(Tokenizer *t) {
    unsigned char *live = calloc((size_t)t->n_ids, 1);
    Buffer joined = {0};
    const char *problem = 0;
    if (!live) return "out of memory";
    for (int b = 0; b < 256; b++) live[t->byte_id[b]] = 1;
    if (!(t->merge_slots = empty_slots(t->n_merges, &t->merge_cap))) problem = "out of memory";
    for (int r = 0; r < t->n_merges && !problem; r++) {
        Merge *m = &t->merges[r];
        if (m->left < 4 || m->right < 4 || !live[m->left] || !live[m->right]) {
            problem = "a merge uses a token no earlier merge makes";
            break;
        }
        joined.n = 0;
        if (buf_add(&joined, t->raw[m->left], (size_t)t->raw_len[m->left]) ||
            buf_add(&joined, t->raw[m->right], (size_t)t->raw_len[m->right])) {
            problem = "out of memory";
            break;
        }
        m->result = find_bytes(t, (unsigned char *)joined.bytes, joined.n);
        if (m->result < 0) problem = "a merge makes a token that is not in the vocabulary";
        else if (find_merge(t, m->left, m->right) >= 0) problem = "a merge appears twice";
        else {
            uint64_t h = hash_pair(m->left, m->right) & (t->merge_cap - 1);
            while (t->merge_slots[h] >= 0) h = (h + 1) & (t->merge_cap - 1);
            t->merge_slots[h] = r;
            live[m->result] = 1;
        }
    }
    for (int i = 4; i < t->n_ids && !problem; i++)
        if (!live[i]) problem = "a token is neither a byte nor made by a merge";
    free(live);
    buf_free(&joined);
    return problem;
}

const char *tok_prepare(Tokenizer *t) {
    const char *problem = check_table(t);
    if (problem) return problem;
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    for (int i = 0; i < t->n_ids; i++)
        if (t->raw[i] && t->raw_len[i] == 1 && t->kind != TOK_WORD) t->byte_id[t->raw[i][0]] = i;
    if (t->kind == TOK_BYTE) {  /* exactly the specials, then byte b at 4 + b */
        if (t->n_ids != 260) return "the byte tokenizer has other than 260 ids";
        for (int b = 0; b < 256; b++)
            if (t->byte_id[b] != 4 + b) return "the byte tokenizer's ids are out of order";
    }
    if (t->kind == TOK_BPE) {
        for (int b = 0; b < 256; b++)
            if (t->byte_id[b] < 0) return "the tokenizer lacks a token for a single byte";
        if ((problem = check_merges(t))) return problem;
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
    if (t->raw)
        for (int i = 0; i < t->n_ids; i++) free(t->raw[i]);
    free(t->raw);
    free(t->raw_len);
    free(t->char_cp);
    free(t->merges);
    free(t->merge_slots);
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

/* One BPE piece: its bytes' ids, then the lowest-rank merge (leftmost of
 * equals) applied while any adjacent pair has one. The candidates sit in a
 * min-heap by (rank, position), the tokens in a linked list, so a piece of
 * n bytes takes O(n log n), as in the tokenizers library. */
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

static int encode_piece(const Tokenizer *t, const unsigned char *s, size_t n, Ids *out) {
    int *token = malloc(sizeof(int) * (n ? n : 1)), *next = malloc(sizeof(int) * (n ? n : 1));
    int *prev = malloc(sizeof(int) * (n ? n : 1));
    /* each merge adds at most two candidates to the n - 1 first ones */
    Candidate *heap = malloc(sizeof(Candidate) * (3 * n + 1));
    int status = -1, size = 0;
    if (!token || !next || !prev || !heap) goto done;
    for (size_t i = 0; i < n; i++) {
        token[i] = t->byte_id[s[i]];
        next[i] = i + 1 < n ? (int)i + 1 : -1;
        prev[i] = (int)i - 1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        int m = find_merge(t, token[i], token[i + 1]);
        if (m >= 0) heap_push(heap, &size, (Candidate){m, (int)i});
    }
    while (size) {
        Candidate c = heap_pop(heap, &size);
        int a = c.at, b = next[a];
        /* stale: a was merged away (token -1) or its pair changed */
        if (token[a] < 0 || b < 0 || t->merges[c.rank].left != token[a] ||
            t->merges[c.rank].right != token[b])
            continue;
        token[a] = t->merges[c.rank].result;
        token[b] = -1;
        next[a] = next[b];
        if (next[b] >= 0) prev[next[b]] = a;
        int m;
        if (prev[a] >= 0 && (m = find_merge(t, token[prev[a]], token[a])) >= 0)
            heap_push(heap, &size, (Candidate){m, prev[a]});
        if (next[a] >= 0 && (m = find_merge(t, token[a], token[next[a]])) >= 0)
            heap_push(heap, &size, (Candidate){m, a});
    }
    status = 0;
    for (int i = n ? 0 : -1; i >= 0 && !status; i = next[i]) status = ids_push(out, token[i]);
done:
    free(token), free(next), free(prev), free(heap);
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
        int id = find_bytes(t, (unsigned char *)words.bytes + start, (size_t)(ends.ids[w] - start));
        status = ids_push(out, id >= 0 ? id : t->unk_id);
    }
    buf_free(&words);
    ids_free(&ends);
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
