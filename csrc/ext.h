/* The loadable SQLite extension's own parts (sqlite_ext.c, tokenize.c,
 * sample.c): tokenizers and sampling in C, giving what the Python package
 * gives for the same database and seed. */
#ifndef SQLGPT_EXT_H
#define SQLGPT_EXT_H
#include <stddef.h>
#include <stdint.h>

/* ---- tokenize.c ---- */
enum { TOK_WORD, TOK_CHAR, TOK_BYTE, TOK_BPE, TOK_HF };
/* an imported (hf) tokenizer's shape: byte-level BPE (GPT-2's, llama 3's,
 * Qwen2's) or SentencePiece-style BPE with byte fallback (llama 2's) */
enum { SHAPE_BYTE_LEVEL, SHAPE_SENTENCEPIECE };
/* sentencepiece: how "\u2581" comes before each part of the text between
 * added tokens (a Prepend normalizer: always; Metaspace: unless the part
 * starts with one, before every part or only the text's first) */
enum { PREPEND_NONE, PREPEND_ALWAYS, PREPEND_UNLESS_THERE, PREPEND_FIRST_UNLESS_THERE };
/* pre-tokenizer steps, run in order, each cutting every piece of the one
 * before: a PATTERN_* of contract.h (a Split, "isolated"), or these */
enum { STEP_DIGIT = 64, STEP_DIGITS, STEP_PREFIX_SPACE };
#define MAX_STEPS 8

typedef struct { int left, right, result; } Merge;

/* An hf tokenizer's added token: matched in text unless special (its
 * text then the normalized form where normalized is set). */
typedef struct { int id, special, normalized; unsigned char *text; int len; } Added;

/* A tokenizer as the vocab and tokenizer tables define it: every id's
 * bytes (specials: none), the special ids (-1: none), and per kind what
 * encoding needs (char: the code point of each id; bpe, hf: merges by
 * rank, pre-tokenizer steps; hf: its added tokens and normalizer). */
typedef struct {
    int kind, n_ids;
    int pad_id, unk_id, bos_id, eos_id;
    unsigned char **raw;   /* n_ids byte strings (NULL for a special) */
    int *raw_len;
    /* what encoding looks ids up by: the bytes (raw itself), or for hf the
     * tokenizer.json text (byte-level: the bytes it stands for); NULL: none */
    unsigned char **key;
    int *key_len;
    char **name;           /* each special's text (<eos>, <|im_end|>), else NULL */
    int shape, nfc, prepend, ignore_merges;         /* hf */
    int steps[MAX_STEPS], n_steps;                  /* bpe, hf */
    Added *added; int n_added;                      /* hf */
    /* lookups, built by tok_prepare */
    uint32_t *char_cp; int n_chars;       /* char: code points of ids 4.. in order */
    Merge *merges; int n_merges;          /* bpe, hf: in rank order */
    int *merge_slots; int merge_cap;      /* bpe, hf: hash of (left, right) -> merge index */
    unsigned char *walls;                 /* bpe, hf: 1 for each id no merge takes */
    int byte_id[256];                     /* the id of each single byte (sentencepiece: <0xXX>) */
    int *id_slots; int id_cap;            /* hash of a token's key -> id */
    unsigned char added_first[256];       /* hf: the first bytes of added tokens matched in text */
} Tokenizer;

/* A growable array of ids. */
typedef struct { int *ids; int n, cap; } Ids;
int ids_push(Ids *ids, int id);
void ids_free(Ids *ids);

/* A growable byte buffer. */
typedef struct { char *bytes; size_t n, cap; } Buffer;
int buf_add(Buffer *b, const void *data, size_t n);
void buf_free(Buffer *b);

/* tok_prepare: the lookups of a filled Tokenizer; 0, or a message (static).
 * tok_index: only its lookup of ids by key (tok_prepare then keeps it). */
const char *tok_index(Tokenizer *t);
/* The id whose key is w (n bytes), or -1 (after tok_index). */
int tok_find(const Tokenizer *t, const unsigned char *w, size_t n);
/* text (n bytes of UTF-8) in Unicode's NFC onto out; 0 or -1 (out of memory). */
int nfc(const unsigned char *text, size_t n, Buffer *out);
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
