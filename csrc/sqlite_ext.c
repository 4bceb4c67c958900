/* sqlgpt as a loadable SQLite extension (sqlgpt0.so, entry point
 * sqlite3_sqlgpt_init): sqlgpt_generate, sqlgpt_tokens, sqlgpt_logprob and
 * sqlgpt_embed over the model stored in a database, with the kernel's own
 * decode step and no Python. The model is read through SQL on the host's
 * connection (or, for sqlgpt_model('file.db'), a read-only one of its own),
 * checked as the Python loader checks it (schema, shapes, CRC-32 of every
 * row, finite values), and kept per connection until a new checkpoint.
 * Every failure is a SQL error with a message; nothing aborts. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sqlite3ext.h>
SQLITE_EXTENSION_INIT1
#include "ext.h"  /* first: sqlgpt.h is also CFFI's cdef, with no includes */
#include "sqlgpt.h"

#define APPLICATION_ID 0x53514C47
#define MIN_SCHEMA 3   /* the tensors view, read for every shape */
#define MAX_SCHEMA 4
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
    double *probs;
    Tokenizer tok;
    sqlite3_int64 step;      /* the checkpoint loaded: a newer one reloads */
} Model;

typedef struct {
    sqlite3 *db;             /* the host's connection */
    sqlite3 *own;            /* a model file's own read-only connection, or NULL */
    char schema[128], prefix[64];
    int precision;
    Model *model;
    sqlite3_mutex *mutex;    /* one call at a time per connection: one KV cache */
} Ext;

/* ---- errors: a message in err (static-sized), returned as SQL errors ---- */
typedef struct { char text[512]; } Err;

static int fail(Err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(Err *e, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(e->text, sizeof(e->text), fmt, args);
    va_end(args);
    return -1;
}

static void *own_alloc(Model *m, size_t bytes) {
    if (m->n_owned == m->cap_owned) {
        int cap = m->cap_owned ? 2 * m->cap_owned : 64;
        void **grown = realloc(m->owned, sizeof(void *) * (size_t)cap);
        if (!grown) return NULL;
        m->owned = grown;
        m->cap_owned = cap;
    }
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64)) return NULL;
    memset(p, 0, bytes ? bytes : 64);
    m->owned[m->n_owned++] = p;
    return p;
}

static void model_free(Model *m) {
    if (!m) return;
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    tok_free(&m->tok);
    free(m);
}

/* ---- SQL helpers ---- */
static sqlite3 *conn_of(const Ext *x) { return x->own ? x->own : x->db; }

/* A statement over the model's table `table`: the schema and prefix
 * filled in for each %s of sql (schema, then prefix + table). */
static sqlite3_stmt *prepare(const Ext *x, Err *e, const char *sql, const char *table) {
    char *text = sqlite3_mprintf(sql, x->own ? "main" : x->schema, x->prefix, table);
    sqlite3_stmt *stmt = NULL;
    if (!text) return fail(e, "out of memory"), NULL;
    if (sqlite3_prepare_v2(conn_of(x), text, -1, &stmt, NULL) != SQLITE_OK) {
        fail(e, "cannot read the model's %s%s table: %s", x->prefix, table,
             sqlite3_errmsg(conn_of(x)));
        stmt = NULL;
    }
    sqlite3_free(text);
    return stmt;
}

static int schema_version(const Ext *x, Err *e) {
    sqlite3_stmt *s;
    int version = 0;
    if (x->prefix[0]) {
        s = prepare(x, e, "SELECT value FROM \"%w\".\"%w%w\" WHERE key = 'version'", "schema");
        if (!s) return fail(e, "no sqlgpt model with the prefix %s here", x->prefix);
        if (sqlite3_step(s) == SQLITE_ROW) version = sqlite3_column_int(s, 0);
    } else {
        int app = 0;
        if (!(s = prepare(x, e, "PRAGMA \"%w\".application_id", ""))) return -1;
        if (sqlite3_step(s) == SQLITE_ROW) app = sqlite3_column_int(s, 0);
        sqlite3_finalize(s);
        if (!(s = prepare(x, e, "PRAGMA \"%w\".user_version", ""))) return -1;
        if (sqlite3_step(s) == SQLITE_ROW) version = sqlite3_column_int(s, 0);
        if (app != APPLICATION_ID) version = -1;
    }
    sqlite3_finalize(s);
    if (version < 0 || version == 0)
        return fail(e, "the database holds no sqlgpt model (train one with sqlgpt, or select "
                       "one with sqlgpt_model)");
    if (version > MAX_SCHEMA)
        return fail(e, "the model's schema version %d is newer than this extension reads (%d): "
                       "upgrade sqlgpt", version, MAX_SCHEMA);
    if (version < MIN_SCHEMA)
        return fail(e, "the model's schema version %d predates the tensors view (version %d): "
                       "resume or compact it with sqlgpt to migrate it", version, MIN_SCHEMA);
    return version;
}

/* ---- the config table ---- */
typedef struct {
    int layers, embed, heads, kv_heads, seq_len, vocab, final_norm, tie;
    int norm, pos, mlp, lora;
    double norm_eps, rope_theta;
    char tokenizer[16];
} Config;

static int choose(const char *value, const char *const *names, int n) {
    for (int i = 0; i < n; i++)
        if (value && !strcmp(value, names[i])) return i;
    return -1;
}

static int read_config(const Ext *x, Config *c, Err *e) {
    static const char *const norms[] = {"layernorm", "rmsnorm"};
    static const char *const positions[] = {"learned", "sinusoidal", "rope", "none"};
    static const char *const mlps[] = {"relu", "gelu", "swiglu"};
    sqlite3_stmt *s = prepare(x, e, "SELECT key, value FROM \"%w\".\"%w%w\"", "config");
    if (!s) return -1;
    memset(c, 0, sizeof(*c));
    c->norm = c->pos = c->mlp = -1;
    while (sqlite3_step(s) == SQLITE_ROW) {
        const char *key = (const char *)sqlite3_column_text(s, 0);
        const char *text = (const char *)sqlite3_column_text(s, 1);
        int value = sqlite3_column_int(s, 1);
        if (!key) continue;
        if (!strcmp(key, "num_layers")) c->layers = value;
        else if (!strcmp(key, "embed_dim")) c->embed = value;
        else if (!strcmp(key, "num_heads")) c->heads = value;
        else if (!strcmp(key, "kv_heads")) c->kv_heads = value;
        else if (!strcmp(key, "seq_len")) c->seq_len = value;
        else if (!strcmp(key, "n_vocab")) c->vocab = value;
        else if (!strcmp(key, "final_norm")) c->final_norm = value;
        else if (!strcmp(key, "tie_weights")) c->tie = value;
        else if (!strcmp(key, "norm_eps")) c->norm_eps = sqlite3_column_double(s, 1);
        else if (!strcmp(key, "rope_theta")) c->rope_theta = sqlite3_column_double(s, 1);
        else if (!strcmp(key, "norm")) c->norm = choose(text, norms, 2);
        else if (!strcmp(key, "pos")) c->pos = choose(text, positions, 4);
        else if (!strcmp(key, "mlp")) c->mlp = choose(text, mlps, 3);
        else if (!strcmp(key, "lora_rank")) c->lora = 1;
        else if (!strcmp(key, "tokenizer") && text) snprintf(c->tokenizer, 16, "%s", text);
    }
    int status = sqlite3_finalize(s);
    if (status != SQLITE_OK) return fail(e, "cannot read the config table: %s",
                                         sqlite3_errmsg(conn_of(x)));
    if (c->lora)
        return fail(e, "the model is a LoRA fine-tune: `sqlgpt merge` it into a plain model for "
                       "the extension");
    if (c->layers < 1 || c->layers > 1024 || c->embed < 1 || c->embed > 65536 || c->heads < 1 ||
        c->embed % c->heads || c->kv_heads < 0 || (c->kv_heads && c->heads % c->kv_heads) ||
        c->seq_len < 1 || c->seq_len > 1 << 20 || c->vocab < 1 || c->vocab > 1 << 24 ||
        c->norm < 0 || c->pos < 0 || c->mlp < 0 || !(c->norm_eps > 0) ||
        !(c->rope_theta > 0) || (c->pos == 2 && (c->embed / c->heads) % 2))
        return fail(e, "the config table is damaged (an impossible architecture)");
    return 0;
}

/* ---- tensors: shapes from the tensors view, rows from the weight tables ---- */
typedef struct {
    char name[64];
    int rows, cols, seen;
    float *data;
} Tensor;

typedef struct { Tensor *t; int n; } Tensors;

static Tensor *find_tensor(Tensors *ts, const char *name) {
    for (int i = 0; i < ts->n; i++)
        if (!strcmp(ts->t[i].name, name)) return &ts->t[i];
    return NULL;
}

static int read_shapes(const Ext *x, Model *m, Tensors *ts, Err *e) {
    sqlite3_stmt *s = prepare(x, e, "SELECT name, rows, cols FROM \"%w\".\"%w%w\"", "tensors");
    if (!s) return -1;
    int cap = 0;
    while (sqlite3_step(s) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(s, 0);
        sqlite3_int64 rows = sqlite3_column_int64(s, 1), cols = sqlite3_column_int64(s, 2);
        if (!name || strlen(name) >= 64 || rows < 1 || cols < 1 || rows * cols > (1LL << 31)) {
            sqlite3_finalize(s);
            return fail(e, "the tensors view is damaged");
        }
        if (ts->n == cap) {
            cap = cap ? 2 * cap : 64;
            Tensor *grown = realloc(ts->t, sizeof(Tensor) * (size_t)cap);
            if (!grown) return sqlite3_finalize(s), fail(e, "out of memory");
            ts->t = grown;
        }
        Tensor *t = &ts->t[ts->n++];
        snprintf(t->name, sizeof(t->name), "%s", name);
        t->rows = (int)rows, t->cols = (int)cols, t->seen = 0;
        t->data = own_alloc(m, sizeof(float) * (size_t)(rows * cols));
        if (!t->data) return sqlite3_finalize(s), fail(e, "out of memory");
    }
    if (sqlite3_finalize(s) != SQLITE_OK || !ts->n)
        return fail(e, "cannot read the tensors view: %s", sqlite3_errmsg(conn_of(x)));
    return 0;
}

/* One weight row: its data, m and v BLOBs checked (length, CRC-32 of the
 * three, finite data) and the data copied into row i of t. */
static int take_row(Tensor *t, int i, sqlite3_stmt *s, int first, Err *e) {
    if (!t || i < 0 || i >= t->rows) return fail(e, "a weight row belongs to no tensor");
    int bytes = t->cols * 4;
    const void *blob[3];
    for (int b = 0; b < 3; b++) {
        blob[b] = sqlite3_column_blob(s, first + b);
        if (sqlite3_column_bytes(s, first + b) != bytes || !blob[b])
            return fail(e, "row %d of %s is %d bytes, not %d: the file is damaged", i, t->name,
                        sqlite3_column_bytes(s, first + b), bytes);
    }
    uint32_t crc;
    crc32_rows(&crc, blob[0], blob[1], blob[2], 1, t->cols);
    if ((sqlite3_int64)crc != sqlite3_column_int64(s, first + 3))
        return fail(e, "row %d of %s fails its checksum: the file is damaged", i, t->name);
    float *row = t->data + (size_t)i * t->cols;
    memcpy(row, blob[0], (size_t)bytes);
    for (int c = 0; c < t->cols; c++)
        if (!isfinite(row[c])) return fail(e, "%s holds NaN or Inf", t->name);
    t->seen++;
    return 0;
}

static int read_rows(const Ext *x, Tensors *ts, Err *e) {
    static const char *const queries[][2] = {
        {"SELECT type, NULL, position, data, m, v, crc FROM \"%w\".\"%w%w\"", "embeddings"},
        {"SELECT 'layers.' || layer || '.' || component, NULL, i, data, m, v, crc "
         "FROM \"%w\".\"%w%w\"", "layers"},
        {"SELECT 'head', NULL, i, data, m, v, crc FROM \"%w\".\"%w%w\"", "head"},
        {"SELECT name, NULL, i, data, m, v, crc FROM \"%w\".\"%w%w\"", "norms"}};
    for (int q = 0; q < 4; q++) {
        sqlite3_stmt *s = prepare(x, e, queries[q][0], queries[q][1]);
        if (!s) return -1;
        int rc;
        while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
            const char *name = (const char *)sqlite3_column_text(s, 0);
            if (take_row(name ? find_tensor(ts, name) : NULL, sqlite3_column_int(s, 2), s, 3, e))
                return sqlite3_finalize(s), -1;
        }
        sqlite3_finalize(s);
        if (rc != SQLITE_DONE)
            return fail(e, "cannot read the %s table: %s", queries[q][1],
                        sqlite3_errmsg(conn_of(x)));
    }
    for (int i = 0; i < ts->n; i++)
        if (ts->t[i].seen != ts->t[i].rows)
            return fail(e, "%s has %d of its %d rows: the file is damaged", ts->t[i].name,
                        ts->t[i].seen, ts->t[i].rows);
    return 0;
}

/* A matrix (C, OC) as decode reads it: column panels (float32 or bf16). */
static float *panels(Model *m, const float *matrix, int C, int OC, int bf16, Err *e) {
    float *out = own_alloc(m, (size_t)panels_size(C, OC) * (bf16 ? 2 : 4));
    if (!out) return fail(e, "out of memory"), NULL;
    pack_panels(out, matrix, C, OC, bf16);
    return out;
}

/* The int8/int4 copy of matrix `name` (C, OC) as the kernel reads it: every
 * row's values, then every row's scales (sqlgpt.quant.kernel_block), each
 * row checked: its length, CRC-32 of q || scales, finite scales. */
static float *quantized(const Ext *x, Model *m, const char *name, int C, int OC, int bits,
                        Err *e) {
    long row_bytes = quant_row_bytes(C, bits), groups = C / m->group;
    char *block = own_alloc(m, (size_t)quant_size(C, OC, bits, m->group));
    if (!block) return fail(e, "out of memory"), NULL;
    sqlite3_stmt *s = prepare(x, e, "SELECT i, q, scales, crc FROM \"%w\".\"%w%w\" WHERE "
                                    "tensor = ?1 AND bits = ?2 ORDER BY i", "quantized");
    if (!s) return NULL;
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 2, bits);
    int row = 0, rc, status = 0;
    while (!status && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        const void *q = sqlite3_column_blob(s, 1), *scales = sqlite3_column_blob(s, 2);
        if (sqlite3_column_int64(s, 0) != row || row >= OC ||
            sqlite3_column_bytes(s, 1) != row_bytes || !q ||
            sqlite3_column_bytes(s, 2) != 4 * groups || !scales) {
            status = fail(e, "the int%d weights of %s are damaged: row %d", bits, name, row);
            break;
        }
        uint32_t crc = crc32_bytes(crc32_bytes(0, q, (size_t)row_bytes), scales,
                                   (size_t)(4 * groups));
        if ((sqlite3_int64)crc != sqlite3_column_int64(s, 3)) {
            status = fail(e, "the int%d weights of %s are damaged: row %d fails its checksum",
                          bits, name, row);
            break;
        }
        float *out = (float *)(block + (size_t)OC * row_bytes) + (size_t)row * groups;
        memcpy(block + (size_t)row * row_bytes, q, (size_t)row_bytes);
        memcpy(out, scales, (size_t)(4 * groups));
        for (long g = 0; g < groups && !status; g++)
            if (!isfinite(out[g]))
                status = fail(e, "the int%d weights of %s have NaN or Inf scales", bits, name);
        row++;
    }
    sqlite3_finalize(s);
    if (!status && row != OC)
        status = fail(e, "the int%d weights of %s are damaged: %d of %d rows", bits, name, row,
                      OC);
    return status ? NULL : (float *)block;
}

/* The group and checkpoint of the int8/int4 copy, checked against the
 * model (the copy of another step is stale: quantize again). */
static int quantized_set(const Ext *x, Model *m, int bits, Err *e) {
    sqlite3_stmt *s = prepare(x, e, "SELECT count(*), min(group_size), max(group_size), "
                                    "min(step), max(step) FROM \"%w\".\"%w%w\" WHERE bits = ?",
                              "quantized");
    if (!s) return fail(e, "the model has no int%d weights: sqlgpt quantize --db FILE --bits %d",
                        bits, bits);
    sqlite3_bind_int(s, 1, bits);
    int status = sqlite3_step(s) == SQLITE_ROW ? 0 : fail(e, "cannot read the quantized table");
    if (!status && !sqlite3_column_int64(s, 0))
        status = fail(e, "the model has no int%d weights: sqlgpt quantize --db FILE --bits %d",
                      bits, bits);
    if (!status) {
        int g0 = sqlite3_column_int(s, 1), g1 = sqlite3_column_int(s, 2);
        sqlite3_int64 s0 = sqlite3_column_int64(s, 3), s1 = sqlite3_column_int64(s, 4);
        if (g0 != g1 || s0 != s1 || (g0 != 32 && g0 != 64))
            status = fail(e, "the int%d weights are damaged: their rows disagree on the group "
                             "size or step", bits);
        else if (s0 != m->step)
            status = fail(e, "the int%d weights are of step %lld, the model of step %lld: "
                             "sqlgpt quantize it again", bits, (long long)s0, (long long)m->step);
        else if (m->cfg.C % g0 || m->cfg.F % g0)
            status = fail(e, "the int%d weights' group size %d does not fit the model", bits, g0);
        m->group = g0;
    }
    sqlite3_finalize(s);
    return status;
}

/* A matrix in a precision's layout. */
static float *matrix(const Ext *x, Model *m, int precision, const char *name, const float *data,
                     int C, int OC, Err *e) {
    if (precision == PRECISION_INT8 || precision == PRECISION_INT4)
        return quantized(x, m, name, C, OC, precision == PRECISION_INT8 ? 8 : 4, e);
    return panels(m, data, C, OC, precision == PRECISION_BF16, e);
}

/* The shape a block tensor must have (rows, cols), by its component;
 * 0 for a name that is none of a block's. */
static int block_shape(const ModelConfig *cfg, const char *component, int *rows, int *cols) {
    int C = cfg->C, F = cfg->F, KV = cfg->KVH * (cfg->C / cfg->NH);
    static const char *const names[] = {"ln1_w", "ln1_b", "ln2_w", "ln2_b", "q_b", "proj_b",
                                        "fc2_b", "k_b", "v_b", "gate_b", "fc1_b", "q", "proj",
                                        "k", "v", "gate", "fc1", "fc2"};
    int shapes[][2] = {{1, C}, {1, C}, {1, C}, {1, C}, {1, C}, {1, C}, {1, C}, {1, KV}, {1, KV},
                       {1, F}, {1, F}, {C, C}, {C, C}, {C, KV}, {C, KV}, {C, F}, {C, F}, {F, C}};
    int i = choose(component, names, (int)(sizeof(names) / sizeof(names[0])));
    if (i < 0) return 0;
    *rows = shapes[i][0], *cols = shapes[i][1];
    return 1;
}

/* Every tensor of the view has the shape the architecture gives its
 * name (the kernel reads them by those shapes), and no other name. */
static int check_shapes(const Tensors *ts, const ModelConfig *cfg, Err *e) {
    for (int i = 0; i < ts->n; i++) {
        const Tensor *t = &ts->t[i];
        int rows = -1, cols = -1, layer, at = 0;
        if (sscanf(t->name, "layers.%d.%n", &layer, &at) == 1 && at > 0) {
            if (layer < 0 || layer >= cfg->num_layers || !block_shape(cfg, t->name + at, &rows,
                                                                       &cols))
                return fail(e, "the tensors view names %s, which is no tensor of the model",
                            t->name);
        } else if (!strcmp(t->name, "wte")) rows = cfg->V, cols = cfg->C;
        else if (!strcmp(t->name, "wpe")) rows = cfg->max_T, cols = cfg->C;
        else if (!strcmp(t->name, "head")) rows = cfg->C, cols = cfg->V;
        else if (!strcmp(t->name, "lnf_w") || !strcmp(t->name, "lnf_b")) rows = 1, cols = cfg->C;
        else return fail(e, "the tensors view names %s, which is no tensor of the model", t->name);
        if (t->rows != rows || t->cols != cols)
            return fail(e, "%s is %d x %d, not the %d x %d the config gives it", t->name, t->rows,
                        t->cols, rows, cols);
    }
    return 0;
}

/* Each tensor into its field of the decode struct w, every matrix in
 * precision's layout (panels, or the stored int8/int4 copy). */
static int place(const Ext *x, Model *m, Tensors *ts, const Config *c, int precision,
                 ModelTensors *w, Err *e) {
    static const char *const vectors[] = {"ln1_w", "ln1_b", "q_b", "k_b", "v_b", "proj_b",
                                          "ln2_w", "ln2_b", "gate_b", "fc1_b", "fc2_b"};
    static const char *const matrices[] = {"q", "k", "v", "proj", "gate", "fc1", "fc2"};
    int C = c->embed;
    w->layers = own_alloc(m, sizeof(LayerTensors) * (size_t)c->layers);
    if (!w->layers) return fail(e, "out of memory");
    char name[96];
    for (int l = 0; l < c->layers; l++) {
        LayerTensors *lt = &w->layers[l];
        float **vfields[] = {&lt->ln1_w, &lt->ln1_b, &lt->q_b, &lt->k_b, &lt->v_b, &lt->proj_b,
                             &lt->ln2_w, &lt->ln2_b, &lt->gate_b, &lt->fc1_b, &lt->fc2_b};
        float **mfields[] = {&lt->q, &lt->k, &lt->v, &lt->proj, &lt->gate, &lt->fc1, &lt->fc2};
        for (int i = 0; i < 11; i++) {
            snprintf(name, sizeof(name), "layers.%d.%s", l, vectors[i]);
            Tensor *t = find_tensor(ts, name);
            *vfields[i] = t ? t->data : NULL;
        }
        for (int i = 0; i < 7; i++) {
            snprintf(name, sizeof(name), "layers.%d.%s", l, matrices[i]);
            Tensor *t = find_tensor(ts, name);
            if (!t) {
                if (i == 4 && c->mlp != 2) continue;  /* gate: swiglu's only */
                return fail(e, "the model lacks %s", name);
            }
            if (!(*mfields[i] = matrix(x, m, precision, name, t->data, t->rows, t->cols, e)))
                return -1;
        }
    }
    Tensor *wte = find_tensor(ts, "wte"), *wpe = find_tensor(ts, "wpe");
    Tensor *head = find_tensor(ts, "head");
    if (!wte || wte->rows != c->vocab || wte->cols != C)
        return fail(e, "wte is missing or of another shape than the config says");
    w->wte = wte->data;
    if (c->pos == 0) {
        if (!wpe || wpe->rows != c->seq_len || wpe->cols != C) return fail(e, "wpe is missing");
        w->wpe = wpe->data;
    } else if (c->pos == 1) {  /* sinusoids, as model.sinusoids computes them */
        if (!(w->wpe = own_alloc(m, sizeof(float) * (size_t)c->seq_len * C)))
            return fail(e, "out of memory");
        for (int t = 0; t < c->seq_len; t++)
            for (int i = 0; i < C / 2; i++) {
                double angle = t / pow(10000.0, (2.0 * i) / C);
                w->wpe[(size_t)t * C + 2 * i] = (float)sin(angle);
                w->wpe[(size_t)t * C + 2 * i + 1] = (float)cos(angle);
            }
    }
    Tensor *lnf_w = find_tensor(ts, "lnf_w"), *lnf_b = find_tensor(ts, "lnf_b");
    w->lnf_w = lnf_w ? lnf_w->data : NULL;
    w->lnf_b = lnf_b ? lnf_b->data : NULL;
    if (!c->tie && !head) return fail(e, "the model lacks its head");
    if (c->tie) {  /* the head is wte transposed */
        float *t = own_alloc(m, sizeof(float) * (size_t)C * c->vocab);
        if (!t) return fail(e, "out of memory");
        for (int v = 0; v < c->vocab; v++)
            for (int i = 0; i < C; i++) t[(size_t)i * c->vocab + v] = wte->data[(size_t)v * C + i];
        w->head = matrix(x, m, precision, "head", t, C, c->vocab, e);
    } else {
        w->head = matrix(x, m, precision, "head", head->data, C, c->vocab, e);
    }
    return w->head ? 0 : -1;
}

/* ---- the tokenizer tables ---- */
static int parse_merges(Tokenizer *t, const char *json, Err *e) {
    /* [[left,right],...] of ids */
    int cap = 0;
    const char *p = json;
    while (*p == ' ') p++;
    if (*p++ != '[') return fail(e, "the BPE merges are damaged");
    for (;;) {
        while (*p == ' ' || *p == ',') p++;
        if (*p == ']') break;
        long left, right;
        char *end;
        if (*p++ != '[') return fail(e, "the BPE merges are damaged");
        left = strtol(p, &end, 10);
        if (end == p || *end != ',') return fail(e, "the BPE merges are damaged");
        p = end + 1;
        right = strtol(p, &end, 10);
        if (end == p || *end != ']') return fail(e, "the BPE merges are damaged");
        p = end + 1;
        if (left < 0 || right < 0 || left >= t->n_ids || right >= t->n_ids ||
            !t->raw[left] || !t->raw[right])
            return fail(e, "a BPE merge names an id out of range");
        if (t->n_merges == cap) {
            cap = cap ? 2 * cap : 256;
            Merge *grown = realloc(t->merges, sizeof(Merge) * (size_t)cap);
            if (!grown) return fail(e, "out of memory");
            t->merges = grown;
        }
        t->merges[t->n_merges++] = (Merge){(int)left, (int)right, -1};
    }
    /* each merge's result: the token whose bytes are left's then right's */
    for (int r = 0; r < t->n_merges; r++) {
        Merge *mg = &t->merges[r];
        int n = t->raw_len[mg->left] + t->raw_len[mg->right];
        for (int id = 0; id < t->n_ids && mg->result < 0; id++)
            if (t->raw[id] && t->raw_len[id] == n &&
                !memcmp(t->raw[id], t->raw[mg->left], (size_t)t->raw_len[mg->left]) &&
                !memcmp(t->raw[id] + t->raw_len[mg->left], t->raw[mg->right],
                        (size_t)t->raw_len[mg->right]))
                mg->result = id;
        if (mg->result < 0) return fail(e, "a BPE merge makes no token of the vocabulary");
    }
    return 0;
}

static int read_tokenizer(const Ext *x, Model *m, const Config *c, Err *e) {
    static const char *const kinds[] = {"word", "char", "byte", "bpe"};
    Tokenizer *t = &m->tok;
    t->kind = choose(c->tokenizer, kinds, 4);
    if (t->kind < 0)
        return fail(e, "the %s tokenizer is not in the extension (it reads word, char, byte "
                       "and bpe)", c->tokenizer[0] ? c->tokenizer : "unnamed");
    t->n_ids = c->vocab;
    t->raw = calloc((size_t)c->vocab, sizeof(unsigned char *));
    t->raw_len = calloc((size_t)c->vocab, sizeof(int));
    if (!t->raw || !t->raw_len) return fail(e, "out of memory");
    sqlite3_stmt *s = prepare(x, e, "SELECT id, bytes FROM \"%w\".\"%w%w\"", "vocab");
    if (!s) return -1;
    int count = 0, rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        sqlite3_int64 id = sqlite3_column_int64(s, 0);
        int n = sqlite3_column_bytes(s, 1);
        const void *bytes = sqlite3_column_blob(s, 1);
        if (id < 0 || id >= c->vocab || t->raw[id] || t->raw_len[id] < 0) {
            sqlite3_finalize(s);
            return fail(e, "the vocab table is damaged (its ids are not 0..%d)", c->vocab - 1);
        }
        count++;
        if (!bytes || !n) {
            t->raw_len[id] = -1;  /* a special: seen, no bytes */
            continue;
        }
        if (!(t->raw[id] = malloc((size_t)n))) return sqlite3_finalize(s), fail(e, "out of memory");
        memcpy(t->raw[id], bytes, (size_t)n);
        t->raw_len[id] = n;
    }
    sqlite3_finalize(s);
    if (rc != SQLITE_DONE || count != c->vocab)
        return fail(e, "the vocab table is damaged (%d ids for a model of %d)", count, c->vocab);
    for (int i = 0; i < t->n_ids; i++)
        if (t->raw_len[i] < 0) t->raw_len[i] = 0;
    if (t->kind == TOK_WORD) {
        t->pad_id = 0, t->unk_id = c->vocab - 1, t->bos_id = t->eos_id = -1;
    } else {
        t->pad_id = 0, t->unk_id = 1, t->bos_id = 2, t->eos_id = 3;
    }
    if (t->kind == TOK_BPE) {
        s = prepare(x, e, "SELECT value FROM \"%w\".\"%w%w\" WHERE key = 'merges'", "tokenizer");
        if (!s) return -1;
        int found = sqlite3_step(s) == SQLITE_ROW;
        int status = found ? parse_merges(t, (const char *)sqlite3_column_text(s, 0), e)
                           : fail(e, "the BPE tokenizer has no merges");
        sqlite3_finalize(s);
        if (status) return -1;
    }
    const char *problem = tok_prepare(t);
    return problem ? fail(e, "the tokenizer is damaged: %s", problem) : 0;
}

static sqlite3_int64 latest_step(const Ext *x, Err *e) {
    sqlite3_stmt *s = prepare(x, e, "SELECT coalesce(max(step), -1) FROM \"%w\".\"%w%w\"",
                              "checkpoints");
    if (!s) return -2;
    sqlite3_int64 step = sqlite3_step(s) == SQLITE_ROW ? sqlite3_column_int64(s, 0) : -2;
    sqlite3_finalize(s);
    return step;
}

/* The model as the database holds it now, read in one transaction. */
static Model *load(const Ext *x, Err *e) {
    Model *m = calloc(1, sizeof(Model));
    Tensors ts = {0};
    Config c;
    if (!m) return fail(e, "out of memory"), NULL;
    m->precision = x->precision;
    /* on the host's connection the calling statement already reads one
     * snapshot; a file's own connection reads in a transaction of its own */
    if (x->own) sqlite3_exec(x->own, "BEGIN", NULL, NULL, NULL);
    int status = schema_version(x, e) < 0 || read_config(x, &c, e) ||
                 (m->step = latest_step(x, e)) < -1 || read_shapes(x, m, &ts, e);
    if (!status) {
        Tensor *k = NULL, *fc1 = NULL;
        char name[32];
        snprintf(name, sizeof(name), "layers.0.k");
        k = find_tensor(&ts, name);
        snprintf(name, sizeof(name), "layers.0.fc1");
        fc1 = find_tensor(&ts, name);
        int hs = c.embed / c.heads;
        if (!k || !fc1) status = fail(e, "the tensors view lacks the model's matrices");
        else if (k->cols % hs || k->rows != c.embed || fc1->rows != c.embed)
            status = fail(e, "layers.0.k is %d x %d and layers.0.fc1 %d x %d: not of the config's "
                             "embed_dim %d", k->rows, k->cols, fc1->rows, fc1->cols, c.embed);
        else {
            m->cfg = (ModelConfig){c.layers, c.embed, c.heads, k->cols / hs, fc1->cols, c.vocab,
                                   c.seq_len, c.norm, c.pos, c.mlp, c.final_norm,
                                   (float)c.norm_eps, (float)c.rope_theta};
            if (c.heads % m->cfg.KVH) status = fail(e, "the k matrix has an impossible shape");
        }
    }
    int integer = m->precision == PRECISION_INT8 || m->precision == PRECISION_INT4;
    status = status || read_rows(x, &ts, e) || check_shapes(&ts, &m->cfg, e) ||
             (integer && quantized_set(x, m, m->precision == PRECISION_INT8 ? 8 : 4, e)) ||
             place(x, m, &ts, &c, PRECISION_FP32, &m->w32, e) ||
             (m->precision != PRECISION_FP32 && place(x, m, &ts, &c, m->precision, &m->w, e)) ||
             read_tokenizer(x, m, &c, e);
    if (!status && m->precision == PRECISION_FP32) m->w = m->w32;
    if (x->own) sqlite3_exec(x->own, "COMMIT", NULL, NULL, NULL);
    free(ts.t);
    if (!status) {
        int KVC = m->cfg.KVH * (c.embed / c.heads);
        m->kcache = own_alloc(m, sizeof(float) * (size_t)key_cache_size(&m->cfg));
        m->vcache = own_alloc(m, sizeof(float) * (size_t)c.layers * c.seq_len * KVC);
        m->logits = own_alloc(m, sizeof(float) * (size_t)(c.vocab > c.embed ? c.vocab : c.embed));
        m->probs = own_alloc(m, sizeof(double) * (size_t)c.vocab);
        if (!m->kcache || !m->vcache || !m->logits || !m->probs) status = fail(e, "out of memory");
    }
    if (status) {
        model_free(m);
        return NULL;
    }
    return m;
}

/* The connection's model, loaded on first use and again after a new checkpoint. */
static Model *model_of(Ext *x, Err *e) {
    sqlite3_int64 step = latest_step(x, e);
    if (x->model && step == x->model->step) return x->model;
    model_free(x->model);
    x->model = load(x, e);
    return x->model;
}

/* ---- decoding ---- */
/* What a decode call is for: generation decodes in the chosen precision;
 * scoring (logits) and hidden states use float32, as the Python functions
 * score through the float32 model whatever the precision. */
enum { GENERATE, SCORE, HIDDEN };

/* One decode call: rows tokens[0..n) at positions pos0.. of slot 0; into
 * out, the logits (or the final hidden states) of its last n_out rows. */
static int run(Model *m, const int *tokens, int n, int pos0, int n_out, int mode, float *out,
               Err *e) {
    int scoring = mode != GENERATE, hidden = mode == HIDDEN;
    int *slots = calloc((size_t)n, sizeof(int)), *pos = malloc(sizeof(int) * (size_t)n);
    int *rows = malloc(sizeof(int) * (size_t)n_out);
    int status = SQLGPT_NOMEM;
    if (slots && pos && rows) {
        for (int i = 0; i < n; i++) pos[i] = pos0 + i;
        for (int i = 0; i < n_out; i++) rows[i] = n - n_out + i;
        ModelTensors w = scoring ? m->w32 : m->w;
        if (hidden) w.head = NULL;
        status = decode_batch(&m->cfg, &w, scoring ? PRECISION_FP32 : m->precision, m->group,
                              m->kcache, m->vcache, n, slots, tokens, pos, n_out, rows, out);
    }
    free(slots), free(pos), free(rows);
    return status == SQLGPT_OK ? 0 : fail(e, "out of memory");
}

/* ---- argument checks ---- */
static const char *text_arg(sqlite3_value *v, const char *fn, const char *what, int *len,
                            Err *e) {
    if (sqlite3_value_type(v) == SQLITE_NULL) return fail(e, "%s: %s is NULL", fn, what), NULL;
    if (sqlite3_value_type(v) != SQLITE_TEXT)
        return fail(e, "%s: %s must be TEXT", fn, what), NULL;
    const char *text = (const char *)sqlite3_value_text(v);
    *len = sqlite3_value_bytes(v);
    if (!text) return fail(e, "%s: out of memory", fn), NULL;
    if (!utf8_valid(text, (size_t)*len)) return fail(e, "%s: %s is not valid UTF-8", fn, what), NULL;
    long chars = 0;
    for (int i = 0; i < *len; i++) chars += ((unsigned char)text[i] & 0xc0) != 0x80;
    if (chars > MAX_TEXT_CHARS)
        return fail(e, "%s: %s is longer than 10,000,000 characters", fn, what), NULL;
    return text;
}

static int int_arg(sqlite3_value *v, const char *fn, const char *what, sqlite3_int64 low,
                   sqlite3_int64 high, sqlite3_int64 *out, Err *e) {
    sqlite3_int64 value = sqlite3_value_int64(v);
    if (sqlite3_value_type(v) != SQLITE_INTEGER || value < low || value > high)
        return fail(e, "%s: %s must be an integer from %lld to %lld", fn, what, (long long)low,
                    (long long)high);
    *out = value;
    return 0;
}

/* ---- the SQL functions ---- */
typedef int (*Body)(sqlite3_context *, Ext *, Model *, int, sqlite3_value **, Err *);

static void call(sqlite3_context *ctx, int argc, sqlite3_value **argv, const char *fn, Body body) {
    Ext *x = sqlite3_user_data(ctx);
    Err e = {{0}};
    sqlite3_mutex_enter(x->mutex);
    Model *m = model_of(x, &e);
    int status = m ? body(ctx, x, m, argc, argv, &e) : -1;
    sqlite3_mutex_leave(x->mutex);
    if (status) {
        char message[600];
        int named = !strncmp(e.text, fn, strlen(fn));  /* the argument checks name fn */
        snprintf(message, sizeof(message), "%s%s%s", named ? "" : fn, named ? "" : ": ", e.text);
        sqlite3_result_error(ctx, message, -1);
    }
}

static int encode_arg(Model *m, sqlite3_value *v, const char *fn, Ids *ids, Err *e) {
    int len;
    const char *text = text_arg(v, fn, "text", &len, e);
    if (!text) return -1;
    return tok_encode(&m->tok, text, (size_t)len, ids) ? fail(e, "out of memory") : 0;
}

static int tokens_body(sqlite3_context *ctx, Ext *x, Model *m, int argc, sqlite3_value **argv,
                       Err *e) {
    (void)x, (void)argc;
    Ids ids = {0};
    Buffer out = {0};
    if (encode_arg(m, argv[0], "sqlgpt_tokens", &ids, e)) return ids_free(&ids), -1;
    int status = buf_add(&out, "[", 1);
    char number[16];
    for (int i = 0; i < ids.n && !status; i++) {
        int n = snprintf(number, sizeof(number), i ? ", %d" : "%d", ids.ids[i]);
        status = buf_add(&out, number, (size_t)n);
    }
    status = status || buf_add(&out, "]", 1);
    ids_free(&ids);
    if (status) return buf_free(&out), fail(e, "out of memory");
    sqlite3_result_text(ctx, out.bytes, (int)out.n, free);
    return 0;
}

/* The ids a prompt starts from, as Model.prompt_ids gives them. */
static int prompt_ids(Model *m, const char *text, int len, Ids *ids, Err *e) {
    const Tokenizer *t = &m->tok;
    if (!len) return ids_push(ids, t->eos_id >= 0 ? t->eos_id : 1) ? fail(e, "out of memory") : 0;
    if (tok_encode(t, text, (size_t)len, ids)) return fail(e, "out of memory");
    if (!ids->n)
        return fail(e, t->kind == TOK_WORD ? "the prompt has no words" : "the prompt has no tokens");
    int known = 0;
    for (int i = 0; i < ids->n; i++) known |= ids->ids[i] != t->unk_id;
    if (!known) return fail(e, "none of the prompt's tokens are in the vocabulary");
    if (ids->n > m->cfg.max_T) {
        int drop = ids->n - m->cfg.max_T;
        memmove(ids->ids, ids->ids + drop, sizeof(int) * (size_t)m->cfg.max_T);
        ids->n = m->cfg.max_T;
    }
    return 0;
}

static int generate_body(sqlite3_context *ctx, Ext *x, Model *m, int argc, sqlite3_value **argv,
                         Err *e) {
    (void)x;
    const char *fn = "sqlgpt_generate";
    int len;
    sqlite3_int64 max_tokens = DEFAULT_MAX_TOKENS, seed = -1;
    double temperature = 1.0;
    const char *prompt = text_arg(argv[0], fn, "prompt", &len, e);
    if (!prompt) return -1;
    if (argc > 1 && int_arg(argv[1], fn, "max_tokens", 0, MAX_TOKENS, &max_tokens, e)) return -1;
    if (argc > 2) {
        int type = sqlite3_value_type(argv[2]);
        temperature = sqlite3_value_double(argv[2]);
        if ((type != SQLITE_INTEGER && type != SQLITE_FLOAT) || !(temperature >= 0) ||
            temperature > 100)
            return fail(e, "%s: temperature must be a number from 0 to 100", fn);
    }
    if (argc > 3 && sqlite3_value_type(argv[3]) != SQLITE_NULL &&
        int_arg(argv[3], fn, "seed", 0, INT64_MAX, &seed, e))
        return -1;
    Pcg64 rng;
    if (seed < 0) sqlite3_randomness(sizeof(seed), &seed), seed &= INT64_MAX;
    pcg64_seed(&rng, (uint64_t)seed);
    const Tokenizer *t = &m->tok;
    int banned[3], n_banned = 0;
    int candidates[3] = {t->pad_id, t->bos_id, t->unk_id};
    for (int i = 0; i < 3; i++)
        if (candidates[i] >= 0 && candidates[i] != t->eos_id) banned[n_banned++] = candidates[i];
    Ids context = {0};
    Buffer before = {0}, after = {0};
    int status = prompt_ids(m, prompt, len, &context, e);
    int n_prompt = context.n, T = m->cfg.max_T;
    int base = 0, pos = 0;  /* the KV cache holds context[base:base + pos] (generate.Window) */
    for (sqlite3_int64 step = 0; step < max_tokens && !status; step++) {
        if (context.n - base > T) base = context.n - (T / 2 > 1 ? T / 2 : 1), pos = 0;
        int rows = context.n - base - pos;
        status = run(m, context.ids + base + pos, rows, pos, 1, GENERATE, m->logits, e);
        pos += rows;
        if (status) break;
        int token = sample_token(m->logits, m->cfg.V, temperature, banned, n_banned, &rng,
                                 m->probs);
        if (token < 0) status = fail(e, "the model's logits are not finite");
        else if (token == t->eos_id) break;
        else if (ids_push(&context, token)) status = fail(e, "out of memory");
    }
    /* the text the new tokens add: decoded with the prompt, so a character
     * split across the boundary stays whole */
    if (!status && (tok_decode(t, context.ids, n_prompt, &before) ||
                    tok_decode(t, context.ids, context.n, &after)))
        status = fail(e, "out of memory");
    if (!status) {
        if (after.n >= before.n && !memcmp(after.bytes, before.bytes, before.n)) {
            sqlite3_result_text(ctx, after.bytes + before.n, (int)(after.n - before.n),
                                SQLITE_TRANSIENT);
        } else {
            Buffer fresh = {0};
            if (tok_decode(t, context.ids + n_prompt, context.n - n_prompt, &fresh))
                status = fail(e, "out of memory");
            else sqlite3_result_text(ctx, fresh.bytes ? fresh.bytes : "", (int)fresh.n,
                                     SQLITE_TRANSIENT);
            buf_free(&fresh);
        }
    }
    ids_free(&context);
    buf_free(&before), buf_free(&after);
    return status;
}

/* The ids a text is scored on: after <eos> where the tokenizer has one. */
static int scored_ids(Model *m, sqlite3_value *v, const char *fn, Ids *ids, Err *e) {
    if (m->tok.eos_id >= 0 && ids_push(ids, m->tok.eos_id)) return fail(e, "out of memory");
    return encode_arg(m, v, fn, ids, e);
}

static int logprob_body(sqlite3_context *ctx, Ext *x, Model *m, int argc, sqlite3_value **argv,
                        Err *e) {
    (void)x, (void)argc;
    Ids ids = {0};
    if (scored_ids(m, argv[0], "sqlgpt_logprob", &ids, e)) return ids_free(&ids), -1;
    if (ids.n < 2) {
        ids_free(&ids);
        sqlite3_result_null(ctx);
        return 0;
    }
    /* evaluate.windows: T-token windows half a context apart (and one
     * ending at the end), each scoring the targets no earlier one scored */
    int n_targets = ids.n - 1, T = m->cfg.max_T < n_targets ? m->cfg.max_T : n_targets;
    int stride = T / 2 > 1 ? T / 2 : 1, V = m->cfg.V, scored = 0, status = 0;
    int limit = n_targets - T + 1 > 1 ? n_targets - T + 1 : 1;  /* starts below this */
    int last = (limit - 1) / stride * stride;
    int tail = last + T < n_targets;  /* then one more window, ending at the end */
    double total = 0.0;
    float *logits = malloc(sizeof(float) * (size_t)T * V);
    if (!logits) status = fail(e, "out of memory");
    for (int window = 0; window <= last / stride + tail && !status; window++) {
        int start = window <= last / stride ? window * stride : n_targets - T;
        status = run(m, ids.ids + start, T, 0, T, SCORE, logits, e);
        int first = scored - start > 0 ? scored - start : 0;
        for (int r = first; r < T && start + r < n_targets && !status; r++) {
            const float *row = logits + (size_t)r * V;
            float top = row[0];
            for (int i = 1; i < V; i++) top = row[i] > top ? row[i] : top;
            double z = 0.0;
            for (int i = 0; i < V; i++) z += exp((double)row[i] - top);
            total += (double)row[ids.ids[start + r + 1]] - ((double)top + log(z));
        }
        scored = start + (T < n_targets - start ? T : n_targets - start);
    }
    free(logits);
    ids_free(&ids);
    if (!status) sqlite3_result_double(ctx, total);
    return status;
}

static int embed_body(sqlite3_context *ctx, Ext *x, Model *m, int argc, sqlite3_value **argv,
                      Err *e) {
    (void)x, (void)argc;
    Ids ids = {0};
    if (encode_arg(m, argv[0], "sqlgpt_embed", &ids, e)) return ids_free(&ids), -1;
    if (!ids.n) return ids_free(&ids), fail(e, "the text has no tokens");
    int C = m->cfg.C, T = m->cfg.max_T, status = 0;
    double *total = calloc((size_t)C, sizeof(double));
    float *out = malloc(sizeof(float) * (size_t)C);
    if (!total || !out) status = fail(e, "out of memory");
    for (int start = 0; start < ids.n && !status; start += T) {  /* windows of the context */
        int n = ids.n - start < T ? ids.n - start : T;
        float *hidden = malloc(sizeof(float) * (size_t)n * C);
        status = hidden ? run(m, ids.ids + start, n, 0, n, HIDDEN, hidden, e) : fail(e, "out of memory");
        for (int r = 0; r < n && !status; r++)
            for (int c = 0; c < C; c++) total[c] += hidden[(size_t)r * C + c];
        free(hidden);
    }
    for (int c = 0; c < C && !status; c++) out[c] = (float)(total[c] / ids.n);
    if (!status) sqlite3_result_blob(ctx, out, (int)(sizeof(float) * (size_t)C), free);
    else free(out);
    free(total);
    ids_free(&ids);
    return status;
}

static void sqlgpt_generate(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_generate", generate_body);
}
static void sqlgpt_tokens(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_tokens", tokens_body);
}
static void sqlgpt_logprob(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_logprob", logprob_body);
}
static void sqlgpt_embed(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_embed", embed_body);
}

/* sqlgpt_model(name [, precision [, prefix]]): the model the functions use
 * from now on: an attached schema's ('main' is the connection's own file)
 * or a database file's; precision fp32 or bf16. Returns name, after
 * loading the model (so a bad choice fails here). */
static void sqlgpt_model(sqlite3_context *ctx, int argc, sqlite3_value **argv) {
    Ext *x = sqlite3_user_data(ctx);
    Err e = {{0}};
    const char *name = (const char *)sqlite3_value_text(argv[0]);
    const char *precision = argc > 1 ? (const char *)sqlite3_value_text(argv[1]) : "fp32";
    const char *prefix = argc > 2 ? (const char *)sqlite3_value_text(argv[2]) : "";
    if (!name || !*name || strlen(name) >= sizeof(x->schema)) {
        sqlite3_result_error(ctx, "sqlgpt_model: name a schema ('main') or a database file", -1);
        return;
    }
    static const char *const precisions[] = {"fp32", "bf16", "int8", "int4"};
    int code = choose(precision, precisions, 4);  /* PRECISION_FP32 ... PRECISION_INT4 */
    if (code < 0) {
        sqlite3_result_error(ctx, "sqlgpt_model: precision is fp32, bf16, int8 or int4", -1);
        return;
    }
    if (!prefix || strlen(prefix) >= sizeof(x->prefix)) {
        sqlite3_result_error(ctx, "sqlgpt_model: the prefix is too long", -1);
        return;
    }
    sqlite3_mutex_enter(x->mutex);
    int is_schema = 0;
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(x->db, "SELECT 1 FROM pragma_database_list WHERE name = ?", -1, &s,
                           NULL) == SQLITE_OK) {
        sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
        is_schema = sqlite3_step(s) == SQLITE_ROW;
        sqlite3_finalize(s);
    }
    sqlite3 *own = NULL;
    if (!is_schema && sqlite3_open_v2(name, &own, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        snprintf(e.text, sizeof(e.text), "sqlgpt_model: cannot open %s: %s", name,
                 own ? sqlite3_errmsg(own) : "out of memory");
        sqlite3_close(own);
        own = NULL;
    }
    if (!e.text[0]) {
        Ext chosen = *x;
        chosen.own = own;
        snprintf(chosen.schema, sizeof(chosen.schema), "%s", is_schema ? name : "main");
        snprintf(chosen.prefix, sizeof(chosen.prefix), "%s", prefix);
        chosen.precision = code;
        Model *m = load(&chosen, &e);
        if (m) {
            model_free(x->model);
            if (x->own) sqlite3_close(x->own);
            chosen.model = m;
            *x = chosen;
        } else if (own) {
            sqlite3_close(own);
        }
    }
    sqlite3_mutex_leave(x->mutex);
    if (e.text[0]) {
        char message[600];
        snprintf(message, sizeof(message), "%s%s",
                 strncmp(e.text, "sqlgpt_model", 12) ? "sqlgpt_model: " : "", e.text);
        sqlite3_result_error(ctx, message, -1);
    } else {
        sqlite3_result_value(ctx, argv[0]);
    }
}

static void ext_free(void *p) {
    Ext *x = p;
    model_free(x->model);
    if (x->own) sqlite3_close(x->own);
    sqlite3_mutex_free(x->mutex);
    free(x);
}

#ifdef _WIN32
__declspec(dllexport)
#endif
int sqlite3_sqlgpt_init(sqlite3 *db, char **error, const sqlite3_api_routines *api) {
    SQLITE_EXTENSION_INIT2(api);
    Ext *x = calloc(1, sizeof(Ext));
    /* a SQLite built without threads has no mutexes (NULL, whose enter and
     * leave do nothing), and no threads to keep apart */
    if (x) x->mutex = sqlite3_mutex_alloc(SQLITE_MUTEX_FAST);
    if (!x || (!x->mutex && sqlite3_threadsafe())) {
        free(x);
        *error = sqlite3_mprintf("sqlgpt: out of memory");
        return SQLITE_NOMEM;
    }
    x->db = db;
    snprintf(x->schema, sizeof(x->schema), "main");
    x->precision = PRECISION_FP32;
    static const struct { const char *name; int nargs; void (*fn)(sqlite3_context *, int,
                                                                  sqlite3_value **); } fns[] = {
        {"sqlgpt_generate", 1, sqlgpt_generate}, {"sqlgpt_generate", 2, sqlgpt_generate},
        {"sqlgpt_generate", 3, sqlgpt_generate}, {"sqlgpt_generate", 4, sqlgpt_generate},
        {"sqlgpt_tokens", 1, sqlgpt_tokens}, {"sqlgpt_logprob", 1, sqlgpt_logprob},
        {"sqlgpt_embed", 1, sqlgpt_embed}, {"sqlgpt_model", 1, sqlgpt_model},
        {"sqlgpt_model", 2, sqlgpt_model}, {"sqlgpt_model", 3, sqlgpt_model}};
    int n = (int)(sizeof(fns) / sizeof(fns[0]));
    for (int i = 0; i < n; i++) {
        /* the last function registered owns x: freed when the connection closes */
        int rc = sqlite3_create_function_v2(db, fns[i].name, fns[i].nargs, SQLITE_UTF8, x,
                                            fns[i].fn, NULL, NULL, i == n - 1 ? ext_free : NULL);
        if (rc != SQLITE_OK) {
            *error = sqlite3_mprintf("sqlgpt: cannot register %s", fns[i].name);
            return rc;
        }
    }
    return SQLITE_OK;
}
