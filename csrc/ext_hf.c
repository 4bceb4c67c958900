/* An imported (hf) tokenizer read for tokenize.c: the tokenizer table's
 * "tokenizer_json" (the tokenizers library's definition) read with SQLite's
 * own JSON functions, in the shapes sqlgpt/data/tokenizers/hf.py imports
 * (known_shape): byte-level BPE, no normalizer or NFC, a ByteLevel
 * pre-tokenizer alone or after Split steps by contract.PRETOKENIZER_PATTERNS
 * and Digits steps; or SentencePiece-style BPE with byte fallback, spaces as
 * "\u2581" by a normalizer or a Metaspace pre-tokenizer. What the extension
 * cannot run exactly as the library does is refused here, one line naming
 * it; a damaged definition is a SQL error, never a crash: every id is
 * checked against the model's n_ids before it is used, and sizes come from
 * n_ids or from what the JSON holds. The vocab rows must be what the
 * definition's tokens stand for, as the Python loader checks. */
#include <stdlib.h>
#include <string.h>
#include "ext_sql.h"

static const char SPM_SPACE[] = "\xe2\x96\x81";  /* U+2581, a space in SentencePiece's tokens */

/* A statement over the JSON text json (?1). */
static sqlite3_stmt *json_query(const Ext *x, const char *sql, const char *json, Err *e) {
    sqlite3_stmt *s = NULL;
    if (sqlite3_prepare_v2(conn_of(x), sql, -1, &s, NULL) != SQLITE_OK) {
        fail(e, "reading the tokenizer needs SQLite's JSON functions: %s",
             sqlite3_errmsg(conn_of(x)));
        return NULL;
    }
    sqlite3_bind_text(s, 1, json, -1, SQLITE_STATIC);
    return s;
}

/* A statement's end: 0 when it ran through, else a SQL error. */
static int finish(const Ext *x, sqlite3_stmt *s, int rc, int status, Err *e) {
    if (!status && rc != SQLITE_DONE && rc != SQLITE_ROW)
        status = fail(e, "the tokenizer's tokenizer_json cannot be read: %s",
                      sqlite3_errmsg(conn_of(x)));
    sqlite3_finalize(s);
    return status;
}

static const char *column(sqlite3_stmt *s, int i) {
    const char *text = (const char *)sqlite3_column_text(s, i);
    return text ? text : "";
}

/* ---- the special ids: "specials", {pad, unk, bos, eos} of ids or null ---- */
static int read_specials(const Ext *x, Tokenizer *t, const char *json, Err *e) {
    static const char *const ROLES[] = {"$.pad", "$.unk", "$.bos", "$.eos"};
    int *ids[] = {&t->pad_id, &t->unk_id, &t->bos_id, &t->eos_id};
    sqlite3_stmt *s = json_query(x, "SELECT json_valid(?1) AND json_type(?1) = 'object'", json, e);
    if (!s) return -1;
    int rc = sqlite3_step(s), ok = rc == SQLITE_ROW && sqlite3_column_int(s, 0);
    if (finish(x, s, rc, 0, e)) return -1;
    if (!ok) return fail(e, "the tokenizer is damaged: its specials are not a JSON object");
    for (int r = 0; r < 4; r++) {
        if (!(s = json_query(x, "SELECT json_type(?1, ?2), json_extract(?1, ?2)", json, e)))
            return -1;
        sqlite3_bind_text(s, 2, ROLES[r], -1, SQLITE_STATIC);
        int status = 0;
        *ids[r] = -1;
        if ((rc = sqlite3_step(s)) == SQLITE_ROW && sqlite3_column_type(s, 0) != SQLITE_NULL &&
            strcmp(column(s, 0), "null")) {
            sqlite3_int64 id = sqlite3_column_int64(s, 1);
            if (strcmp(column(s, 0), "integer") || id < 0 || id >= t->n_ids)
                status = fail(e, "the tokenizer is damaged: its %s id is not one of 0..%d",
                              ROLES[r] + 2, t->n_ids - 1);
            *ids[r] = (int)id;
        }
        if (finish(x, s, rc, status, e)) return -1;
    }
    return 0;
}

/* ---- the model: BPE, and what shape ---- */
static int read_model(const Ext *x, Tokenizer *t, const char *json, Err *e) {
    sqlite3_stmt *s = json_query(
        x, "SELECT json_valid(?1), json_valid(?1) AND json_type(?1) = 'object' AND "
           "json_type(?1, '$.model') = 'object'", json, e);
    if (!s) return -1;
    int rc = sqlite3_step(s), valid = rc == SQLITE_ROW && sqlite3_column_int(s, 0),
        object = rc == SQLITE_ROW && sqlite3_column_int(s, 1);
    if (finish(x, s, rc, 0, e)) return -1;
    if (!valid) return fail(e, "the tokenizer is damaged: its tokenizer_json is not JSON");
    if (!object) return fail(e, "the tokenizer is damaged: its tokenizer_json has no model");
    s = json_query(x, "SELECT json_extract(?1, '$.model.type'), "
                      "json_type(?1, '$.model.byte_fallback'), "
                      "json_type(?1, '$.model.ignore_merges'), "
                      "coalesce(json_extract(?1, '$.model.dropout'), 0), "
                      "coalesce(json_extract(?1, '$.model.continuing_subword_prefix'), ''), "
                      "coalesce(json_extract(?1, '$.model.end_of_word_suffix'), ''), "
                      "json_type(?1, '$.model.vocab'), json_type(?1, '$.model.merges'), "
                      "coalesce(json_type(?1, '$.added_tokens'), 'array')", json, e);
    if (!s) return -1;
    int status = 0;
    if ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        t->shape = !strcmp(column(s, 1), "true") ? SHAPE_SENTENCEPIECE : SHAPE_BYTE_LEVEL;
        t->ignore_merges = !strcmp(column(s, 2), "true");
        if (strcmp(column(s, 0), "BPE"))
            status = fail(e, "the tokenizer's model %s is not in the extension (it runs BPE)",
                          column(s, 0));
        else if (sqlite3_column_double(s, 3) != 0)
            status = fail(e, "the tokenizer's BPE dropout is not in the extension");
        else if (column(s, 4)[0] || column(s, 5)[0])
            status = fail(e, "the tokenizer's BPE subword prefix or word suffix is not in the "
                             "extension");
        else if (strcmp(column(s, 6), "object") || strcmp(column(s, 7), "array") ||
                 strcmp(column(s, 8), "array"))
            status = fail(e, "the tokenizer is damaged: its vocab, merges or added tokens are "
                             "not JSON of their kind");
    }
    return finish(x, s, rc, status, e);
}

/* ---- the normalizer and the pre-tokenizer, step by step ---- */
enum { STEP_TYPE, STEP_PREPEND, STEP_STRING, STEP_REGEX, STEP_CONTENT, STEP_BEHAVIOR, STEP_INVERT,
       STEP_INDIVIDUAL, STEP_PREFIX, STEP_USE_REGEX, STEP_REPLACEMENT, STEP_SCHEME, STEP_SPLIT,
       STEP_SEQUENCE, STEP_INDEX, STEP_COUNT, STEP_JSON_TYPE };

/* The steps of the part at path (a Sequence's, or itself), one row each;
 * a part that is null gives no rows. */
static sqlite3_stmt *steps_of(const Ext *x, const char *json, const char *path,
                              const char *members, Err *e) {
    sqlite3_stmt *s = json_query(
        x, "SELECT json_extract(value, '$.type'), json_extract(value, '$.prepend'), "
           "json_extract(value, '$.pattern.String'), json_extract(value, '$.pattern.Regex'), "
           "json_extract(value, '$.content'), json_extract(value, '$.behavior'), "
           "coalesce(json_type(value, '$.invert'), 'false'), "
           "coalesce(json_type(value, '$.individual_digits'), 'false'), "
           "coalesce(json_type(value, '$.add_prefix_space'), 'true'), "
           "coalesce(json_type(value, '$.use_regex'), 'true'), "
           "json_extract(value, '$.replacement'), json_extract(value, '$.prepend_scheme'), "
           "coalesce(json_type(value, '$.split'), 'true'), sequence, key, count(*) OVER (), "
           "json_type(value) "
           "FROM (SELECT json_extract(?1, ?2 || '.type') = 'Sequence' AS sequence), "
           "json_each(CASE WHEN json_extract(?1, ?2 || '.type') = 'Sequence' "
           "THEN json_extract(?1, ?2 || '.' || ?3) ELSE json_array(json_extract(?1, ?2)) END) "
           "WHERE sequence OR json_type(value) != 'null' ORDER BY key", json, e);
    if (s) {
        sqlite3_bind_text(s, 2, path, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 3, members, -1, SQLITE_STATIC);
    }
    return s;
}

/* byte-level: none or NFC; sentencepiece: [Prepend "\u2581",] Replace " " by it, or none
 * (then Metaspace does it) */
static int read_normalizer(const Ext *x, Tokenizer *t, const char *json, int *replaced, Err *e) {
    sqlite3_stmt *s = steps_of(x, json, "$.normalizer", "normalizers", e);
    if (!s) return -1;
    int rc = SQLITE_DONE, status = 0, n = 0;
    *replaced = 0;
    t->prepend = PREPEND_NONE;
    while (!status && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        const char *type = column(s, STEP_TYPE);
        if (strcmp(column(s, STEP_JSON_TYPE), "object")) {
            status = fail(e, "the tokenizer is damaged: its normalizer is not JSON objects");
            break;
        }
        int sequence = sqlite3_column_int(s, STEP_SEQUENCE);
        int last = n + 1 == sqlite3_column_int(s, STEP_COUNT);
        if (t->shape == SHAPE_BYTE_LEVEL && !strcmp(type, "NFC") && !sequence) t->nfc = 1;
        else if (t->shape == SHAPE_SENTENCEPIECE && sequence && n == 0 && !last &&
                 !strcmp(type, "Prepend") && !strcmp(column(s, STEP_PREPEND), SPM_SPACE))
            t->prepend = PREPEND_ALWAYS;
        else if (t->shape == SHAPE_SENTENCEPIECE && sequence && last && !strcmp(type, "Replace") &&
                 !strcmp(column(s, STEP_STRING), " ") &&
                 !strcmp(column(s, STEP_CONTENT), SPM_SPACE))
            *replaced = 1;
        else status = fail(e, "the tokenizer's normalizer step %s is not in the extension", type);
        n++;
    }
    if (!status && t->shape == SHAPE_SENTENCEPIECE && n && !*replaced)
        status = fail(e, "the tokenizer's normalizer does not turn spaces into U+2581");
    return finish(x, s, rc, status, e);
}

static int add_step(Tokenizer *t, int step, Err *e) {
    if (t->n_steps == MAX_STEPS)
        return fail(e, "the tokenizer's pre-tokenizer has more steps than the extension runs");
    t->steps[t->n_steps++] = step;
    return 0;
}

/* byte-level: Split and Digits steps, then ByteLevel; sentencepiece: none
 * where the normalizer turned the spaces (replaced), else Metaspace */
static int read_pre_tokenizer(const Ext *x, Tokenizer *t, const char *json, int replaced,
                              Err *e) {
    sqlite3_stmt *s = steps_of(x, json, "$.pre_tokenizer", "pretokenizers", e);
    if (!s) return -1;
    /* last_step: a ByteLevel, or the spaces turned */
    int rc = SQLITE_DONE, status = 0, n = 0, last_step = replaced;
    while (!status && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        const char *type = column(s, STEP_TYPE), *regex = column(s, STEP_REGEX);
        if (strcmp(column(s, STEP_JSON_TYPE), "object")) {
            status = fail(e, "the tokenizer is damaged: its pre-tokenizer is not JSON objects");
            break;
        }
        int pattern = choose(regex, PATTERN_REGEXES,
                             (int)(sizeof(PATTERN_REGEXES) / sizeof(PATTERN_REGEXES[0])));
        int last = n + 1 == sqlite3_column_int(s, STEP_COUNT);
        n++;
        if (t->shape == SHAPE_SENTENCEPIECE) {
            /* older files say add_prefix_space instead */
            const char *scheme = column(s, STEP_SCHEME)[0] ? column(s, STEP_SCHEME)
                                 : !strcmp(column(s, STEP_PREFIX), "true") ? "always" : "never";
            if (strcmp(type, "Metaspace") || replaced || !last ||
                strcmp(column(s, STEP_REPLACEMENT), SPM_SPACE) ||
                strcmp(column(s, STEP_SPLIT), "false") ||
                (strcmp(scheme, "first") && strcmp(scheme, "always") && strcmp(scheme, "never")))
                status = fail(e, "the tokenizer's pre-tokenizer step %s is not in the extension",
                              type);
            t->prepend = !strcmp(scheme, "first") ? PREPEND_FIRST_UNLESS_THERE
                         : !strcmp(scheme, "always") ? PREPEND_UNLESS_THERE : PREPEND_NONE;
            last_step = 1;
        } else if (!strcmp(type, "ByteLevel") && last) {
            last_step = 1;
            if (!strcmp(column(s, STEP_PREFIX), "true")) status = add_step(t, STEP_PREFIX_SPACE, e);
            if (!status && !strcmp(column(s, STEP_USE_REGEX), "true"))
                status = add_step(t, PATTERN_GPT_2, e);
        } else if (!strcmp(type, "Digits")) {
            status = add_step(t, strcmp(column(s, STEP_INDIVIDUAL), "true") ? STEP_DIGITS
                                                                            : STEP_DIGIT, e);
        } else if (!strcmp(type, "Split") && pattern >= 0 &&
                   !strcmp(column(s, STEP_BEHAVIOR), "Isolated") &&
                   !strcmp(column(s, STEP_INVERT), "false")) {
            status = add_step(t, pattern, e);
        } else if (!strcmp(type, "Split") && pattern < 0) {
            status = fail(e, "the tokenizer splits by a pattern the extension does not know "
                             "(%.60s): it runs only contract.PRETOKENIZER_PATTERNS",
                          regex[0] ? regex : column(s, STEP_STRING));
        } else {
            status = fail(e, "the tokenizer's pre-tokenizer step %s is not in the extension",
                          type);
        }
    }
    if (!status && !last_step)
        status = fail(e, t->shape == SHAPE_BYTE_LEVEL
                             ? "the tokenizer's pre-tokenizer does not end in ByteLevel"
                             : "the tokenizer does not turn spaces into U+2581");
    return finish(x, s, rc, status, e);
}

/* ---- the vocabulary: each token's key ---- */
/* The byte a ByteLevel character stands for, or -1: GPT-2's alphabet has
 * the printable bytes (! to ~, U+00A1 to U+00AC, U+00AE to U+00FF) as
 * themselves and the 68 others, in byte order, from U+0100. */
static int byte_of(uint32_t c) {
    if ((c >= '!' && c <= '~') || (c >= 0xa1 && c <= 0xac) || (c >= 0xae && c <= 0xff))
        return (int)c;
    if (c < 0x100 || c >= 0x100 + 68) return -1;
    c -= 0x100;
    return c <= 0x20 ? (int)c : c < 0x21 + 34 ? 0x7f + (int)c - 0x21 : 0xad;
}

/* A token's text (UTF-8, n bytes) as the key encoding looks it up by:
 * byte-level, the bytes its characters stand for (NULL where one stands
 * for none); sentencepiece, the text itself. */
static unsigned char *key_of(const Tokenizer *t, const char *text, int n, int *len) {
    unsigned char *key = malloc((size_t)n + 1);
    if (!key) return NULL;
    if (t->shape == SHAPE_SENTENCEPIECE) {
        memcpy(key, text, (size_t)n);
        return *len = n, key;
    }
    *len = 0;
    for (int i = 0; i < n;) {
        int size = 0, b;
        const unsigned char *p = (const unsigned char *)text + i;
        uint32_t c = p[0];
        if (c < 0x80) size = 1;
        else if ((size = (c >= 0xc2 && c < 0xe0) ? 2 : 0) && i + 1 < n)
            c = (c & 0x1f) << 6 | (p[1] & 0x3f);
        if (!size || i + size > n || (b = byte_of(c)) < 0) return free(key), NULL;
        key[(*len)++] = (unsigned char)b;
        i += size;
    }
    return key;
}

/* What the vocab row of a token with this text holds (hf.token_bytes):
 * its key's bytes; for sentencepiece its text with "\u2581" as a space, or
 * the byte of a <0xXX> token. */
static int row_matches(const Tokenizer *t, int id, const char *text, int n) {
    const unsigned char *raw = t->raw[id];
    int len = t->raw_len[id];
    if (t->shape == SHAPE_BYTE_LEVEL)
        return len == t->key_len[id] && !memcmp(raw, t->key[id], (size_t)len);
    if (n == 6 && !memcmp(text, "<0x", 3) && text[5] == '>' &&
        strspn(text + 3, "0123456789abcdefABCDEF") >= 2)
        return len == 1 && raw[0] == strtol((char[]){text[3], text[4], 0}, NULL, 16);
    Buffer expected = {0};
    int status = 0;
    for (int i = 0; i < n && !status; i++)
        if (i + 3 <= n && !memcmp(text + i, SPM_SPACE, 3))
            status = buf_add(&expected, " ", 1), i += 2;
        else status = buf_add(&expected, text + i, 1);
    int same = !status && expected.n == (size_t)len && !memcmp(expected.bytes, raw, (size_t)len);
    buf_free(&expected);
    return same;
}

static int read_vocab(const Ext *x, Tokenizer *t, const char *json, Err *e) {
    sqlite3_stmt *s = json_query(x, "SELECT key, value, json_type(value) FROM "
                                    "json_each(?1, '$.model.vocab')", json, e);
    if (!s) return -1;
    t->key = calloc((size_t)t->n_ids, sizeof(unsigned char *));
    t->key_len = calloc((size_t)t->n_ids, sizeof(int));
    int rc = SQLITE_DONE, status = t->key && t->key_len ? 0 : fail(e, "out of memory");
    while (!status && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        sqlite3_int64 id = sqlite3_column_int64(s, 1);
        const char *text = column(s, 0);
        int n = sqlite3_column_bytes(s, 0);
        if (strcmp(column(s, 2), "integer") || id < 0 || id >= t->n_ids)
            status = fail(e, "the tokenizer is damaged: its vocab gives %.40s an id out of 0..%d",
                          text, t->n_ids - 1);
        else if (t->key[id])
            status = fail(e, "the tokenizer is damaged: two tokens have id %d", (int)id);
        else if (!(t->key[id] = key_of(t, text, n, &t->key_len[id])))
            t->key[id] = malloc(1), t->key_len[id] = -1;  /* stands for no bytes: never looked up */
        if (!status && !t->key[id]) status = fail(e, "out of memory");
        if (!status && t->raw[id] && (t->key_len[id] < 0 || !row_matches(t, (int)id, text, n)))
            status = fail(e, "the tokenizer is damaged: its vocab rows do not match its "
                             "tokenizer_json (id %d)", (int)id);
    }
    status = finish(x, s, rc, status, e);
    for (int i = 0; i < t->n_ids && !status; i++)
        if (t->key[i] && t->key_len[i] < 0) free(t->key[i]), t->key[i] = NULL, t->key_len[i] = 0;
    return status;
}

/* ---- the added tokens: their texts, and which are matched in text ---- */
static int read_added(const Ext *x, Tokenizer *t, const char *json, Err *e) {
    sqlite3_stmt *s = json_query(
        x, "SELECT json_extract(value, '$.id'), json_type(value, '$.id'), "
           "json_extract(value, '$.content'), json_type(value, '$.content'), "
           "coalesce(json_type(value, '$.special'), 'false'), "
           "coalesce(json_type(value, '$.normalized'), 'true'), "
           "coalesce(json_type(value, '$.lstrip'), 'false') || "
           "coalesce(json_type(value, '$.rstrip'), 'false') || "
           "coalesce(json_type(value, '$.single_word'), 'false'), count(*) OVER () "
           "FROM json_each(?1, '$.added_tokens') ORDER BY key", json, e);
    if (!s) return -1;
    t->name = calloc((size_t)t->n_ids, sizeof(char *));
    int rc = SQLITE_DONE, status = t->name ? 0 : fail(e, "out of memory");
    while (!status && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        sqlite3_int64 id = sqlite3_column_int64(s, 0);
        const char *text = column(s, 2);
        int n = sqlite3_column_bytes(s, 2), special = !strcmp(column(s, 4), "true");
        if (!t->added && !(t->added = calloc((size_t)sqlite3_column_int(s, 7), sizeof(Added))))
            status = fail(e, "out of memory");
        else if (strcmp(column(s, 1), "integer") || id < 0 || id >= t->n_ids ||
                 strcmp(column(s, 3), "text") || !n)
            status = fail(e, "the tokenizer is damaged: an added token is not an id of 0..%d "
                             "with text", t->n_ids - 1);
        else if (t->name[id] || t->raw[id])
            status = fail(e, "the tokenizer is damaged: its vocab rows do not match its "
                             "tokenizer_json (added token %d)", (int)id);
        else if (!special && (strcmp(column(s, 6), "falsefalsefalse") ||
                              (t->shape == SHAPE_SENTENCEPIECE && !strcmp(column(s, 5), "true"))))
            status = fail(e, "the tokenizer's added token %.40s (not special, %s) is not in "
                             "the extension", text, strcmp(column(s, 6), "falsefalsefalse")
                             ? "with lstrip, rstrip or single_word"
                             : "matched in SentencePiece's normalized text");
        else if (!(t->name[id] = malloc((size_t)n + 1)))
            status = fail(e, "out of memory");
        else {
            Added *a = &t->added[t->n_added++];
            Buffer b = {0};
            memcpy(t->name[id], text, (size_t)n + 1);
            a->id = (int)id, a->special = special;
            a->normalized = !strcmp(column(s, 5), "true");
            /* a normalized one is matched in normalized text, as its own normal form */
            if ((a->normalized && t->nfc ? nfc((const unsigned char *)text, (size_t)n, &b)
                                         : buf_add(&b, text, (size_t)n)))
                status = fail(e, "out of memory");
            a->text = (unsigned char *)b.bytes, a->len = (int)b.n;
        }
    }
    status = finish(x, s, rc, status, e);
    for (int i = 0; i < t->n_ids && !status; i++)
        if (!t->raw[i] && !t->name[i])
            status = fail(e, "the tokenizer is damaged: id %d has no bytes and is not an added "
                             "token", i);
        else if (t->raw[i] && !t->key[i])
            status = fail(e, "the tokenizer is damaged: tokenizer_json has no token for id %d", i);
    return status;
}

/* ---- the merges, in rank order: "left right" or [left, right] ---- */
static int merge_side(const Tokenizer *t, const char *text, int n, Err *e) {
    int len, id = -1;
    unsigned char *key = key_of(t, text, n, &len);
    if (key) id = tok_find(t, key, (size_t)len);
    free(key);
    if (id < 0) fail(e, "the tokenizer is damaged: a merge names %.40s, not a token", text);
    return id;
}

static int read_merges(const Ext *x, Tokenizer *t, const char *json, Err *e) {
    sqlite3_stmt *s = json_query(
        x, "SELECT json_type(value), value, json_extract(value, '$[0]'), "
           "json_extract(value, '$[1]'), CASE json_type(value) WHEN 'array' THEN "
           "json_array_length(value) = 2 AND json_type(value, '$[0]') = 'text' AND "
           "json_type(value, '$[1]') = 'text' END, count(*) OVER () "
           "FROM json_each(?1, '$.model.merges') ORDER BY key", json, e);
    if (!s) return -1;
    int rc = SQLITE_DONE, status = 0;
    while (!status && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        const char *left = column(s, 2), *right = column(s, 3), *text = column(s, 1);
        int left_n = sqlite3_column_bytes(s, 2), right_n = sqlite3_column_bytes(s, 3);
        const char *space = strchr(text, ' ');
        int count = sqlite3_column_int(s, 5);
        if (!t->merges && !(t->merges = malloc(sizeof(Merge) * (size_t)(count + 1))))
            return finish(x, s, rc, fail(e, "out of memory"), e);
        if (!strcmp(column(s, 0), "text") && space && !strchr(space + 1, ' ') &&
            (int)strlen(text) == sqlite3_column_bytes(s, 1))
            left = text, left_n = (int)(space - text), right = space + 1,
            right_n = (int)strlen(space + 1);
        else if (!sqlite3_column_int(s, 4)) {
            status = fail(e, "the tokenizer is damaged: merge %d is not \"left right\" or "
                             "[left, right]", t->n_merges + 1);
            break;
        }
        int a = merge_side(t, left, left_n, e), b = a < 0 ? -1 : merge_side(t, right, right_n, e);
        if (a < 0 || b < 0) status = -1;
        else t->merges[t->n_merges++] = (Merge){a, b, -1};
    }
    return finish(x, s, rc, status, e);  /* tok_prepare checks them and finds each one's result */
}

int read_hf(const Ext *x, Tokenizer *t, Err *e) {
    char *json = tokenizer_value(x, "tokenizer_json", e);
    char *specials = json ? tokenizer_value(x, "specials", e) : NULL;
    const char *problem = NULL;
    int replaced = 0;
    int status = !specials || read_specials(x, t, specials, e) || read_model(x, t, json, e) ||
                 read_normalizer(x, t, json, &replaced, e) ||
                 read_pre_tokenizer(x, t, json, replaced, e) || read_vocab(x, t, json, e) ||
                 read_added(x, t, json, e) ? -1 : 0;
    if (!status && (problem = tok_index(t)))
        status = fail(e, "the tokenizer is damaged: %s", problem);
    if (!status) status = read_merges(x, t, json, e);
    sqlite3_free(json), sqlite3_free(specials);
    return status;
}
