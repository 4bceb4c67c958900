/* The loadable SQLite extension's own parts, shared by its files:
 * sqlite_ext.c (registration and sqlgpt_model), ext_db.c (errors,
 * allocation, the SQL it reads a model with, views, the tokenizer tables),
 * ext_load.c (the config, the tensors and their placement, the whole load)
 * and ext_run.c (decoding and the SQL functions). */
#ifndef SQLGPT_EXT_SQL_H
#define SQLGPT_EXT_SQL_H
#include <sqlite3ext.h>
SQLITE_EXTENSION_INIT3
#include "ext.h"  /* first: sqlgpt.h is also CFFI's cdef, with no includes */
#include "sqlgpt.h"

#define MAX_TOKENS 4096
#define MAX_TEXT_CHARS 10000000
#define DEFAULT_MAX_TOKENS 50

typedef struct {
    ModelConfig cfg;
    ModelTensors w;          /* for generation, in the chosen precision */
    ModelTensors w32;        /* float32, for sqlgpt_logprob and sqlgpt_embed (as in Python) */
    int group;               /* int8/int4: the quantization group */
    void **owned;            /* every allocation of the model, freed together */
    int n_owned, cap_owned;
    int precision;
    float *kcache, *vcache, *logits;
    double *probs, *scratch;  /* the sampler's scratch (V each) */
    int *order;
    Tokenizer tok;
    int chat;                /* its chat template: an index of CHAT_TEMPLATES, or -1 */
    char **labels;           /* a classifier's label names (cfg.L), else NULL */
    const float *cls_w, *cls_b;  /* and its head, float32 (C,L) and (L) */
    sqlite3_int64 step;      /* the checkpoint loaded: a newer one reloads */
    char *file;              /* and the file it came from (another one reloads) */
} Model;

typedef struct {
    sqlite3 *db;             /* the host's connection */
    sqlite3 *own;            /* a model file's own read-only connection, or NULL */
    char schema[128], prefix[64];
    int precision;
    Model *model;
    sqlite3_mutex *mutex;    /* one call at a time per connection: one KV cache */
    int busy;                /* a call is running (SQL it runs must not call back in) */
    int refs;                /* the registered functions sharing this state */
} Ext;

/* ---- errors: a message in err (static-sized), returned as SQL errors ---- */
typedef struct { char text[512]; } Err;
int fail(Err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ext_db.c */
void *own_alloc(Model *m, size_t bytes);  /* zeroed, 64-byte aligned, freed with the model */
void model_free(Model *m);
int choose(const char *value, const char *const *names, int n);  /* index in names, or -1 */
sqlite3 *conn_of(const Ext *x);
/* A statement over the model's table `table`: the schema and prefix
 * filled in for each %s of sql (schema, then prefix + table). */
sqlite3_stmt *prepare(const Ext *x, Err *e, const char *sql, const char *table);
/* The model's schema version (a readable one), or -1 with e set: NO_MODEL
 * when what x names holds no sqlgpt model at all (or cannot be read as a
 * database), as opposed to a model of a version this cannot read. */
enum { NO_MODEL = -2 };
int schema_version(const Ext *x, Err *e);
int check_views(const Ext *x, Err *e);
int check_prefix(const char *prefix, char *out);
typedef struct Config Config;
int read_tokenizer(const Ext *x, Model *m, const Config *c, Err *e);
/* A tokenizer table value (sqlite3_malloc'd; NULL with e set when the key
 * is missing or not text). */
char *tokenizer_value(const Ext *x, const char *key, Err *e);

/* ext_hf.c: an imported tokenizer's specials, names, normalizer,
 * pre-tokenizer, added tokens, keys and merges from its tokenizer_json */
int read_hf(const Ext *x, Tokenizer *t, Err *e);

/* ext_chat.c: the model's chat template (which of contract.CHAT_TEMPLATES,
 * or none the extension renders), and a conversation's prompt ids by it */
int read_chat_template(const Ext *x, Model *m, Err *e);
int chat_prompt(const Ext *x, const Model *m, const char *messages, Ids *ids, int *end_id,
                Err *e);

/* ext_load.c */
Model *load(const Ext *x, Err *e);
Model *model_of(Ext *x, Err *e);

/* ext_run.c: the SQL functions, over what they share: call runs a
 * function's body with the connection's model, its failure a SQL error;
 * text_arg checks a TEXT argument; decode_hidden gives the final hidden
 * states (float32) of the last n_out of n tokens decoded from position 0 */
typedef int (*Body)(sqlite3_context *, Ext *, Model *, int, sqlite3_value **, Err *);
void call(sqlite3_context *ctx, int argc, sqlite3_value **argv, const char *fn, Body body);
const char *text_arg(sqlite3_value *v, const char *fn, const char *what, int *len, Err *e);
int decode_hidden(Model *m, const int *tokens, int n, int n_out, float *out, Err *e);
void sqlgpt_generate(sqlite3_context *c, int n, sqlite3_value **v);
void sqlgpt_chat(sqlite3_context *c, int n, sqlite3_value **v);
void sqlgpt_tokens(sqlite3_context *c, int n, sqlite3_value **v);
void sqlgpt_logprob(sqlite3_context *c, int n, sqlite3_value **v);
void sqlgpt_embed(sqlite3_context *c, int n, sqlite3_value **v);

/* ext_classify.c: a classifier's labels (read at load) and its functions */
int read_labels(const Ext *x, Model *m, Err *e);
void sqlgpt_classify(sqlite3_context *c, int n, sqlite3_value **v);
void sqlgpt_classify_scores(sqlite3_context *c, int n, sqlite3_value **v);

/* the config table's architecture (contract.h's ArchFields), and what
 * else the loader reads from it */
#include "contract.h"      /* generated by build_ext.py from sqlgpt/contract.py */
struct Config {
    ArchFields a;
    int lora;
    char tokenizer[16];
};
#endif
