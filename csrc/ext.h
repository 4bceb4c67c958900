/* The loadable SQLite extension's own parts (sqlite_ext.c, tokenize.c,
 * sample.c): tokenizers and sampling in C, giving what the Python package
 * gives for the same database and seed. */
#ifndef SQLGPT_EXT_H
#define SQLGPT_EXT_H
#include <stddef.h>
#include <stdint.h>

/* ---- tokenize.c ---- */
enum { TOK_WORD, TOK_CHAR, TOK_BYTE, TOK_BPE };

typedef struct { int left, right, result; } Merge;

/* A tokenizer as the vocab and tokenizer tables define it: every id's
 * bytes (specials: none), the special ids (-1: none), and per kind what
 * encoding needs (char: the code point of each id; bpe: merges by rank). */
typedef struct {
    int kind, n_ids;
    int pad_id, unk_id, bos_id, eos_id;
    unsigned char **raw;   /* n_ids byte strings (NULL for a special) */
    int *raw_len;
    /* lookups, built by tok_prepare */
    uint32_t *char_cp; int n_chars;       /* char: code points of ids 4.. in order */
    Merge *merges; int n_merges;          /* bpe: in rank order */
    int *merge_slots; int merge_cap;      /* bpe: hash of (left, right) -> merge index */
    int byte_id[256];                     /* byte, bpe: the id of each single byte */
    int *id_slots; int id_cap;            /* hash of a token's bytes -> id */
} Tokenizer;

/* A growable array of ids. */
typedef struct { int *ids; int n, cap; } Ids;
int ids_push(Ids *ids, int id);
void ids_free(Ids *ids);

/* A growable byte buffer. */
typedef struct { char *bytes; size_t n, cap; } Buffer;
int buf_add(Buffer *b, const void *data, size_t n);
void buf_free(Buffer *b);

/* tok_prepare: the lookups of a filled Tokenizer; 0, or a message (static). */
const char *tok_prepare(Tokenizer *t);
void tok_free(Tokenizer *t);
/* The ids of UTF-8 text (len bytes, well-formed: SQLite's TEXT); 0 or -1
 * (out of memory). */
int tok_encode(const Tokenizer *t, const char *text, size_t len, Ids *out);
/* 1 when text (n bytes) is well-formed UTF-8. */
int utf8_valid(const char *text, size_t n);
/* The text of ids, as the Python decode gives it (invalid UTF-8 replaced
 * by U+FFFD as Python's "replace" does); 0 or -1 (out of memory). */
int tok_decode(const Tokenizer *t, const int *ids, int n, Buffer *out);

#endif
