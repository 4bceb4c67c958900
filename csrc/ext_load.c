/* The loadable extension's loader: a model read through SQL by the same
 * declaration the Python loader reads (contract.h): the config, the tensors
 * the architecture has with their rows checked, their placement in the
 * decode step's structs, and the whole load in one snapshot. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ext_sql.h"

/* ---- the config table: contract.h's ARCH_FIELDS, checked as
 * arch.ArchConfig.validate checks them ---- */


#define N_ARCH_FIELDS ((int)(sizeof(ARCH_FIELDS) / sizeof(ARCH_FIELDS[0])))

/* One stored value into its field of a (arch.typed's rules: an integer
 * may be stored as an integral float, a boolean is 0 or 1); 0, or -1 for
 * a value of the wrong type or out of its bounds. */
static int take_field(ArchFields *a, int f, sqlite3_stmt *s, int column) {
    char *at = (char *)a + ARCH_FIELDS[f].offset;
    int type = sqlite3_column_type(s, column);
    double number = sqlite3_column_double(s, column);
    int numeric = type == SQLITE_INTEGER || type == SQLITE_FLOAT;
    double low = ARCH_FIELDS[f].low, high = ARCH_FIELDS[f].high;
    switch (ARCH_FIELDS[f].kind) {
    case FIELD_INT: {
        sqlite3_int64 value = sqlite3_column_int64(s, column);
        if (type == SQLITE_FLOAT && (number != floor(number) || !(fabs(number) < 9e15))) return -1;
        if (!numeric || (type == SQLITE_FLOAT && (sqlite3_int64)number != value) ||
            value < (sqlite3_int64)low || value > (sqlite3_int64)high)
            return -1;
        *(long long *)at = value;
        return 0;
    }
    case FIELD_FLOAT:  /* an open interval */
        if (!numeric || !isfinite(number) || !(number > low && number < high)) return -1;
        *(double *)at = number;
        return 0;
    case FIELD_BOOL:
        if (!numeric || (number != 0 && number != 1)) return -1;
        *(int *)at = number == 1;
        return 0;
    default: {
        int i = choose((const char *)sqlite3_column_text(s, column), ARCH_FIELDS[f].choices,
                       ARCH_FIELDS[f].n_choices);
        if (type != SQLITE_TEXT || i < 0) return -1;
        *(int *)at = i;
        return 0;
    }
    }
}

/* A field a file predates takes the value arch.ArchConfig gives it. */
static void absent_field(ArchFields *a, int f) {
    char *at = (char *)a + ARCH_FIELDS[f].offset;
    double value = ARCH_FIELDS[f].absent;
    if (ARCH_FIELDS[f].kind == FIELD_INT) *(long long *)at = (long long)value;
    else if (ARCH_FIELDS[f].kind == FIELD_FLOAT) *(double *)at = value;
    else *(int *)at = (int)value;
}

static int read_config(const Ext *x, Config *c, Err *e) {
    sqlite3_stmt *s = prepare(x, e, "SELECT key, value FROM \"%w\".\"%w%w\"", "config");
    if (!s) return -1;
    memset(c, 0, sizeof(*c));
    unsigned char seen[N_ARCH_FIELDS];
    memset(seen, 0, sizeof(seen));
    int n_required = (int)(sizeof(REQUIRED_CONFIG_KEYS) / sizeof(REQUIRED_CONFIG_KEYS[0]));
    int required = 0, status = 0;
    while (!status && sqlite3_step(s) == SQLITE_ROW) {
        const char *key = (const char *)sqlite3_column_text(s, 0);
        const char *text = (const char *)sqlite3_column_text(s, 1);
        if (!key) continue;
        for (int r = 0; r < n_required; r++) required += !strcmp(key, REQUIRED_CONFIG_KEYS[r]);
        if (!strcmp(key, "lora_rank")) c->lora = 1;
        if (!strcmp(key, "tokenizer") && text) snprintf(c->tokenizer, 16, "%s", text);
        for (int f = 0; f < N_ARCH_FIELDS; f++)
            if (!strcmp(key, ARCH_FIELDS[f].name)) {
                seen[f] = 1;
                if (take_field(&c->a, f, s, 1))
                    status = fail(e, "config %s has a bad value %s: the file is damaged", key,
                                  text ? text : "NULL");
            }
    }
    if (sqlite3_finalize(s) != SQLITE_OK && !status)
        return fail(e, "cannot read the config table: %s", sqlite3_errmsg(conn_of(x)));
    if (status) return -1;
    if (required != n_required)
        return fail(e, "the config table lacks a key every model has: the file is damaged");
    for (int f = 0; f < N_ARCH_FIELDS; f++)
        if (!seen[f]) absent_field(&c->a, f);
    if (c->lora)
        return fail(e, "the model is a LoRA fine-tune: `sqlgpt merge` it into a plain model for "
                       "the extension");
    /* the rules between fields (arch.ArchConfig.validate) */
    const ArchFields *a = &c->a;
    long long kvh = a->kv_heads ? a->kv_heads : a->num_heads;
    long long hs = a->head_size ? a->head_size : a->embed_dim / a->num_heads;
    if ((!a->head_size && a->embed_dim % a->num_heads) || a->kv_heads > a->num_heads ||
        a->num_heads % kvh || (a->pos == POS_ROPE && hs % 2) ||
        (a->pos == POS_SINUSOIDAL && a->embed_dim % 2) ||
        (a->rope_scaling == ROPE_SCALING_LLAMA3 &&
         !(a->rope_original_context && a->rope_high_freq > a->rope_low_freq)))
        return fail(e, "the config table is damaged (an impossible architecture)");
    return 0;
}

/* The kernel's ModelConfig of an architecture (arch.ArchConfig's derived
 * sizes: kv heads, the MLP's hidden size by llama's rule for SwiGLU). */
static ModelConfig model_config(const ArchFields *a) {
    int C = (int)a->embed_dim, F = (int)a->ffn_dim;
    if (!F && a->mlp != MLP_SWIGLU) F = 4 * C;
    if (!F) F = (8 * C / 3 + SQLGPT_SWIGLU_MULTIPLE - 1) / SQLGPT_SWIGLU_MULTIPLE *
                SQLGPT_SWIGLU_MULTIPLE;
    int NH = (int)a->num_heads, HS = (int)(a->head_size ? a->head_size : C / NH);
    return (ModelConfig){.num_layers = (int)a->num_layers, .C = C, .NH = NH, .HS = HS,
                         .KVH = (int)(a->kv_heads ? a->kv_heads : a->num_heads), .F = F,
                         .V = (int)a->n_vocab, .max_T = (int)a->seq_len, .norm = a->norm,
                         .pos = a->pos, .mlp = a->mlp, .final_norm = a->final_norm,
                         .norm_eps = (float)a->norm_eps, .rope_theta = (float)a->rope_theta,
                         .rope_scaling = a->rope_scaling,
                         .rope_original_T = (int)a->rope_original_context,
                         .rope_factor = (float)a->rope_factor,
                         .rope_low_freq = (float)a->rope_low_freq,
                         .rope_high_freq = (float)a->rope_high_freq,
                         .L = (int)a->num_labels, .pool = a->pool};
}

static long long dimension(const ModelConfig *cfg, int dim) {
    switch (dim) {
    case DIM_C: return cfg->C;
    case DIM_F: return cfg->F;
    case DIM_Q: return (long long)cfg->NH * cfg->HS;
    case DIM_KV: return (long long)cfg->KVH * cfg->HS;
    case DIM_V: return cfg->V;
    case DIM_T: return cfg->max_T;
    case DIM_L: return cfg->L;
    default: return 1;
    }
}

/* ---- tensors: the contract's components the config gives the model, and
 * their rows from the weight tables ---- */
typedef struct {
    int component, layer;    /* COMPONENTS[component] of block layer (-1: the model's) */
    int rows, cols, seen;
    int format;              /* how it is stored: -1 float32 rows, else TENSOR_FORMATS' */
    float *data;
    unsigned char *has_row;  /* which rows were read (each exactly once) */
} Tensor;

/* t (n of them); at: the index in t of (layer, component), layer num_layers
 * standing for the model's own tensors, or -1 where there is none */
typedef struct { Tensor *t; int n; int *at; int layers; } Tensors;

static Tensor *tensor_at(const Tensors *ts, int layer, int component) {
    int i = ts->at[(size_t)(layer < 0 ? ts->layers : layer) * N_COMPONENTS + component];
    return i < 0 ? NULL : &ts->t[i];
}

static int stored(const ArchFields *a, int component) {
    const Component *k = &COMPONENTS[component];
    return component_present(a, component) &&
           !(k->tied_flag && *(const int *)((const char *)a + k->tied_flag));
}

/* The tensors with rows of their own, with their shapes. */
static int list_tensors(const Config *c, const ModelConfig *cfg, Tensors *ts, Err *e) {
    ts->layers = cfg->num_layers;
    ts->at = malloc(sizeof(int) * (size_t)(cfg->num_layers + 1) * N_COMPONENTS);
    ts->t = malloc(sizeof(Tensor) * (size_t)(cfg->num_layers + 1) * N_COMPONENTS);
    if (!ts->at || !ts->t) return fail(e, "out of memory");
    for (int layer = 0; layer <= cfg->num_layers; layer++)
        for (int k = 0; k < N_COMPONENTS; k++) {
            int here = COMPONENTS[k].in_layer ? layer < cfg->num_layers : layer == cfg->num_layers;
            int *slot = &ts->at[(size_t)layer * N_COMPONENTS + k];
            *slot = -1;
            if (!here || !stored(&c->a, k)) continue;
            *slot = ts->n;
            ts->t[ts->n++] = (Tensor){k, COMPONENTS[k].in_layer ? layer : -1,
                                      (int)dimension(cfg, COMPONENTS[k].rows),
                                      (int)dimension(cfg, COMPONENTS[k].cols), 0, -1, NULL, NULL};
        }
    return 0;
}

/* A tensor's name in the tensor table (layers.3.q, head). */
static void tensor_name(int layer, int component, char *out, size_t n) {
    if (layer >= 0) snprintf(out, n, "layers.%d.%s", layer, COMPONENTS[component].name);
    else snprintf(out, n, "%s", COMPONENTS[component].name);
}

/* The component whose rows hold t's values when t is stored as its integer
 * copy: t itself (a matrix), or for a lookup table the tied component that
 * is it transposed (a tied head holds wte); -1 for none. */
static int integer_source(const Config *c, const Tensor *t) {
    const Component *k = &COMPONENTS[t->component];
    if (k->rows == DIM_ONE) return -1;
    if (!k->lookup) return t->component;
    for (int j = 0; j < N_COMPONENTS; j++)
        if (COMPONENTS[j].tied_to && !strcmp(COMPONENTS[j].tied_to, k->name) &&
            component_present(&c->a, j) && !stored(&c->a, j))
            return j;
    return -1;
}

/* The tensor_formats table (since version 6): which tensors an import keeps
 * in half rows or as their integer copy (store.read_formats' checks). */
static int read_formats(const Ext *x, int version, const Config *c, Tensors *ts, Err *e) {
    if (version < 6) return 0;
    sqlite3_stmt *s = prepare(x, e, "SELECT name, format FROM \"%w\".\"%w%w\"", "tensor_formats");
    if (!s) return -1;
    int n_formats = (int)(sizeof(TENSOR_FORMATS) / sizeof(TENSOR_FORMATS[0])), status = 0;
    char name[96];
    while (!status && sqlite3_step(s) == SQLITE_ROW) {
        const char *tensor = (const char *)sqlite3_column_text(s, 0);
        const char *format = (const char *)sqlite3_column_text(s, 1);
        Tensor *t = NULL;
        int f = -1;
        for (int i = 0; tensor && i < ts->n && !t; i++) {
            tensor_name(ts->t[i].layer, ts->t[i].component, name, sizeof(name));
            if (!strcmp(name, tensor)) t = &ts->t[i];
        }
        for (int i = 0; format && i < n_formats; i++)
            if (!strcmp(format, TENSOR_FORMATS[i])) f = i;
        if (!t || f < 0 || (TENSOR_FORMAT_BITS[f] && integer_source(c, t) < 0))
            status = fail(e, "the tensor_formats table is damaged: %s stored as %s",
                          tensor ? tensor : "NULL", format ? format : "NULL");
        else
            t->format = f;
    }
    if (sqlite3_finalize(s) != SQLITE_OK && !status)
        return fail(e, "cannot read the tensor_formats table: %s", sqlite3_errmsg(conn_of(x)));
    return status;
}

/* Validate before allocating: the weights the config claims must fit in
 * the file that is said to hold them (its pages), so a damaged or hostile
 * config cannot make the loader take gigabytes before any row is read. */
static int check_size(const Ext *x, const Tensors *ts, Err *e) {
    double claimed = 0, file = 1;
    for (int i = 0; i < ts->n; i++)
        claimed += (ts->t[i].format < 0 ? 4.0 : TENSOR_FORMAT_BYTES[ts->t[i].format]) *
                   ts->t[i].rows * ts->t[i].cols;
    static const char *const pragmas[] = {"PRAGMA \"%w\".page_count", "PRAGMA \"%w\".page_size"};
    for (int p = 0; p < 2; p++) {
        sqlite3_stmt *s = prepare(x, e, pragmas[p], "");
        if (!s) return -1;
        file *= sqlite3_step(s) == SQLITE_ROW ? sqlite3_column_double(s, 0) : 0;
        sqlite3_finalize(s);
    }
    if (claimed > file)
        return fail(e, "the config claims %.0f MB of weights, more than the %.0f MB file holds: "
                       "the file is damaged", claimed / 1e6, file / 1e6);
    return 0;
}

/* Every tensor's storage, once the file is known to be big enough. */
static int alloc_tensors(Model *m, Tensors *ts, Err *e) {
    for (int i = 0; i < ts->n; i++) {
        Tensor *t = &ts->t[i];
        t->data = own_alloc(m, sizeof(float) * (size_t)t->rows * (size_t)t->cols);
        t->has_row = own_alloc(m, (size_t)t->rows);
        if (!t->data || !t->has_row) return fail(e, "out of memory");
    }
    return 0;
}

/* One weight row (contract.ROW_LAYOUTS): data of cols float32, then m and
 * v of as many (a full row; crc over data || m || v) or both empty (a
 * compacted or merged file; crc over data), finite data; copied into row i
 * of t. A tensor kept in half (tensor_formats) has rows of cols 2-byte
 * values, m and v empty, widened here; one kept as its integer copy has
 * no rows. */
static int take_row(Tensor *t, sqlite3_int64 i, sqlite3_stmt *s, int first, Err *e) {
    if (!t || i < 0 || i >= t->rows || t->has_row[i])
        return fail(e, "a weight row belongs to no tensor, or to one twice: the file is damaged");
    t->has_row[i] = 1;
    const char *name = COMPONENTS[t->component].name;
    if (t->format >= 0 && TENSOR_FORMAT_BITS[t->format])
        return fail(e, "%s has weight rows though it is stored as its int%d copy: the file is "
                       "damaged", name, TENSOR_FORMAT_BITS[t->format]);
    int half = t->format >= 0;
    int bytes = t->cols * (half ? 2 : 4), moments = sqlite3_column_bytes(s, first + 1);
    if (half && moments) return fail(e, "row %d of %s has moments: the file is damaged", (int)i, name);
    const void *blob[3];
    for (int b = 0; b < 3; b++) {
        blob[b] = sqlite3_column_blob(s, first + b);
        int n = sqlite3_column_bytes(s, first + b);
        if (n != (b ? moments : bytes) || (n && !blob[b]) || (moments && moments != bytes))
            return fail(e, "row %d of %s is %d bytes, not %d: the file is damaged", (int)i, name,
                        n, bytes);
    }
    uint32_t crc;
    if (moments) crc32_rows(&crc, blob[0], blob[1], blob[2], 1, t->cols);
    else crc = crc32_bytes(0, blob[0], (size_t)bytes);
    if ((sqlite3_int64)crc != sqlite3_column_int64(s, first + 3))
        return fail(e, "row %d of %s fails its checksum: the file is damaged", (int)i, name);
    float *row = t->data + (size_t)i * t->cols;
    if (!half) memcpy(row, blob[0], (size_t)bytes);
    for (int c = 0; half && c < t->cols; c++) {
        uint16_t h;
        memcpy(&h, (const char *)blob[0] + 2 * c, 2);
        if (t->format == TENSOR_F16) {
            _Float16 value;
            memcpy(&value, &h, 2);
            row[c] = (float)value;
        } else {  /* bfloat16: float32's top half */
            uint32_t bits = (uint32_t)h << 16;
            memcpy(&row[c], &bits, 4);
        }
    }
    for (int c = 0; c < t->cols; c++)
        if (!isfinite(row[c])) return fail(e, "%s holds NaN or Inf", name);
    t->seen++;
    return 0;
}

/* The tensor a row of weight table `table` belongs to: (layer, component). */
static Tensor *row_tensor(const Tensors *ts, int table, sqlite3_stmt *s) {
    const char *name = (const char *)sqlite3_column_text(s, 1);
    int in_layer = sqlite3_column_type(s, 0) != SQLITE_NULL;
    sqlite3_int64 layer = in_layer ? sqlite3_column_int64(s, 0) : -1;
    if (!name || (in_layer && (layer < 0 || layer >= ts->layers))) return NULL;
    for (int k = 0; k < N_COMPONENTS; k++)
        if (COMPONENTS[k].table == table && COMPONENTS[k].in_layer == in_layer &&
            !strcmp(COMPONENTS[k].name, name))
            return tensor_at(ts, (int)layer, k);
    return NULL;
}

static int read_rows(const Ext *x, int version, Tensors *ts, Err *e) {
    int n_tables = (int)(sizeof(WEIGHT_QUERIES) / sizeof(WEIGHT_QUERIES[0]));
    for (int q = 0; q < n_tables; q++) {
        if (WEIGHT_TABLE_SINCE[q] > version) continue;  /* an older file has no such table */
        sqlite3_stmt *s = prepare(x, e, WEIGHT_QUERIES[q][1], WEIGHT_QUERIES[q][0]);
        if (!s) return -1;
        int rc;
        while ((rc = sqlite3_step(s)) == SQLITE_ROW)
            if (take_row(row_tensor(ts, q, s), sqlite3_column_int64(s, 2), s, 3, e))
                return sqlite3_finalize(s), -1;
        sqlite3_finalize(s);
        if (rc != SQLITE_DONE)
            return fail(e, "cannot read the %s table: %s", WEIGHT_QUERIES[q][0],
                        sqlite3_errmsg(conn_of(x)));
    }
    for (int i = 0; i < ts->n; i++)
        if (ts->t[i].seen != ts->t[i].rows &&
            !(ts->t[i].format >= 0 && TENSOR_FORMAT_BITS[ts->t[i].format])) {
            const Tensor *t = &ts->t[i];
            if (t->layer >= 0)
                return fail(e, "layers.%d.%s has %d of its %d rows: the file is damaged",
                            t->layer, COMPONENTS[t->component].name, t->seen, t->rows);
            return fail(e, "%s has %d of its %d rows: the file is damaged",
                        COMPONENTS[t->component].name, t->seen, t->rows);
        }
    return 0;
}

/* A matrix (C, OC) as decode reads it: column panels (float32, bf16 or f16). */
static float *panels(Model *m, const float *matrix, int C, int OC, int half, Err *e) {
    float *out = own_alloc(m, (size_t)panels_size(C, OC) * (half ? 2 : 4));
    if (!out) return fail(e, "out of memory"), NULL;
    pack_panels(out, matrix, C, OC, half);
    return out;
}

/* The int8/int4 copy of matrix `name` (C, OC) as the kernel reads it (the
 * rows as stored, every row's values then every row's scales, arranged by
 * quant_arrange), each row checked: its length, CRC-32 of q || scales,
 * finite scales. */
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
    if (!status && quant_arrange(block, C, OC, bits, m->group) != SQLGPT_OK)
        status = fail(e, "out of memory");
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

/* The values of the tensors kept as their integer copy (tensor_formats),
 * from its rows: a matrix (C, OC) from its own, a lookup table (V, C)
 * from the tied component's (a tied head's rows are wte's). */
static int read_integers(const Ext *x, Model *m, const Config *c, Tensors *ts, Err *e) {
    char name[96];
    for (int i = 0; i < ts->n; i++) {
        Tensor *t = &ts->t[i];
        int bits = t->format >= 0 ? TENSOR_FORMAT_BITS[t->format] : 0;
        if (!bits) continue;
        int source = integer_source(c, t), lookup = COMPONENTS[t->component].lookup;
        int C = lookup ? t->cols : t->rows, OC = lookup ? t->rows : t->cols;
        tensor_name(lookup ? -1 : t->layer, source, name, sizeof(name));
        if (quantized_set(x, m, bits, e)) return -1;
        const float *block = quantized(x, m, name, C, OC, bits, e);
        float *row = malloc(sizeof(float) * (size_t)C);
        if (!block || !row) return free(row), block ? fail(e, "out of memory") : -1;
        for (int j = 0; j < OC; j++) {
            quant_row_values(lookup ? t->data + (size_t)j * C : row, block, C, OC, bits,
                             m->group, j);
            for (int k = 0; !lookup && k < C; k++) t->data[(size_t)k * OC + j] = row[k];
        }
        free(row);
        t->seen = t->rows;
    }
    return 0;
}

/* A matrix in a precision's layout. */
static float *matrix(const Ext *x, Model *m, int precision, const char *name, const float *data,
                     int C, int OC, Err *e) {
    if (precision == PRECISION_INT8 || precision == PRECISION_INT4)
        return quantized(x, m, name, C, OC, precision == PRECISION_INT8 ? 8 : 4, e);
    return panels(m, data, C, OC, panel_half(precision), e);
}


/* Each tensor into its field of the decode struct w (COMPONENTS' field):
 * vectors and lookup tables as they are read, matrices in precision's
 * layout (panels, or the stored int8/int4 copy); a tied tensor its
 * source transposed; sinusoidal positions computed. */
/* A classifier's head as stored (float32 rows), for its functions. */
static void head_of(Model *m, const Tensors *ts) {
    for (int k = 0; k < N_COMPONENTS; k++) {
        const Tensor *t = COMPONENTS[k].in_layer ? NULL : tensor_at(ts, -1, k);
        if (t && !strcmp(COMPONENTS[k].name, "cls_w")) m->cls_w = t->data;
        if (t && !strcmp(COMPONENTS[k].name, "cls_b")) m->cls_b = t->data;
    }
}

static int place(const Ext *x, Model *m, const Tensors *ts, const Config *c, int precision,
                 ModelTensors *w, Err *e) {
    const ModelConfig *cfg = &m->cfg;
    char name[96];
    w->layers = own_alloc(m, sizeof(LayerTensors) * (size_t)cfg->num_layers);
    if (!w->layers) return fail(e, "out of memory");
    for (int i = 0; i < ts->n; i++) {
        const Tensor *t = &ts->t[i];
        const Component *k = &COMPONENTS[t->component];
        char *owner = k->in_layer ? (char *)&w->layers[t->layer] : (char *)w;
        float **field = (float **)(owner + k->field);
        if (k->rows == DIM_ONE || k->lookup) {
            *field = t->data;
            continue;
        }
        tensor_name(t->layer, t->component, name, sizeof(name));
        if (!(*field = matrix(x, m, precision, name, t->data, t->rows, t->cols, e))) return -1;
    }
    for (int k = 0; k < N_COMPONENTS; k++) {  /* the model's tied tensors */
        if (COMPONENTS[k].in_layer || !component_present(&c->a, k) || stored(&c->a, k)) continue;
        const Tensor *source = NULL;
        for (int j = 0; j < N_COMPONENTS; j++)
            if (!COMPONENTS[j].in_layer && !strcmp(COMPONENTS[j].name, COMPONENTS[k].tied_to))
                source = tensor_at(ts, -1, j);
        if (!source) return fail(e, "the model lacks %s", COMPONENTS[k].tied_to);
        int rows = source->cols, cols = source->rows;
        float *t = own_alloc(m, sizeof(float) * (size_t)rows * cols);
        if (!t) return fail(e, "out of memory");
        for (int r = 0; r < cols; r++)
            for (int i = 0; i < rows; i++) t[(size_t)i * cols + r] = source->data[(size_t)r * rows + i];
        float **field = (float **)((char *)w + COMPONENTS[k].field);
        if (!(*field = matrix(x, m, precision, COMPONENTS[k].name, t, rows, cols, e))) return -1;
    }
    if (cfg->pos == POS_SINUSOIDAL) {  /* as model.sinusoids computes them */
        int C = cfg->C;
        if (!(w->wpe = own_alloc(m, sizeof(float) * (size_t)cfg->max_T * C)))
            return fail(e, "out of memory");
        for (int t = 0; t < cfg->max_T; t++)
            for (int i = 0; i < C / 2; i++) {
                double angle = t / pow(10000.0, (2.0 * i) / C);
                w->wpe[(size_t)t * C + 2 * i] = (float)sin(angle);
                w->wpe[(size_t)t * C + 2 * i + 1] = (float)cos(angle);
            }
    }
    return 0;
}

static sqlite3_int64 latest_step(const Ext *x, Err *e) {
    sqlite3_stmt *s = prepare(x, e, "SELECT coalesce(max(step), -1) FROM \"%w\".\"%w%w\"",
                              "checkpoints");
    if (!s) return -2;
    sqlite3_int64 step = sqlite3_step(s) == SQLITE_ROW ? sqlite3_column_int64(s, 0) : -2;
    sqlite3_finalize(s);
    return step;
}

/* The file a schema reads ("" for a temporary or in-memory one). */
static const char *file_of(const Ext *x) {
    const char *file = sqlite3_db_filename(conn_of(x), x->own ? "main" : x->schema);
    return file ? file : "";
}

static sqlite3_int64 data_version(const Ext *x) {
    Err ignored;
    sqlite3_stmt *s = prepare(x, &ignored, "PRAGMA \"%w\".data_version", "");
    sqlite3_int64 version = s && sqlite3_step(s) == SQLITE_ROW ? sqlite3_column_int64(s, 0) : -1;
    sqlite3_finalize(s);
    return version;
}

/* The model as the database holds it now, read in one transaction. */
Model *load(const Ext *x, Err *e) {
    Model *m = calloc(1, sizeof(Model));
    Tensors ts = {0};
    Config c;
    if (!m) return fail(e, "out of memory"), NULL;
    m->precision = x->precision;
    /* on the host's connection the calling statement already reads one
     * snapshot; a file's own connection reads in a transaction of its own */
    if (x->own) sqlite3_exec(x->own, "BEGIN", NULL, NULL, NULL);
    int integer = m->precision == PRECISION_INT8 || m->precision == PRECISION_INT4;
    int version = schema_version(x, e);
    int status = version < 0 || check_views(x, e) || read_config(x, &c, e) ||
                 (m->step = latest_step(x, e)) < -1;
    if (!status) m->cfg = model_config(&c.a);
    status = status || list_tensors(&c, &m->cfg, &ts, e) ||
             read_formats(x, version, &c, &ts, e) || check_size(x, &ts, e) ||
             alloc_tensors(m, &ts, e) || read_rows(x, version, &ts, e) ||
             read_integers(x, m, &c, &ts, e) ||
             (integer && quantized_set(x, m, m->precision == PRECISION_INT8 ? 8 : 4, e)) ||
             place(x, m, &ts, &c, PRECISION_FP32, &m->w32, e) ||
             (m->precision != PRECISION_FP32 && place(x, m, &ts, &c, m->precision, &m->w, e)) ||
             read_tokenizer(x, m, &c, e) || read_chat_template(x, m, e) ||
             read_labels(x, m, e);
    if (!status && m->cfg.L) head_of(m, &ts);
    if (!status && m->precision == PRECISION_FP32) m->w = m->w32;
    if (x->own) sqlite3_exec(x->own, "COMMIT", NULL, NULL, NULL);
    free(ts.t);
    free(ts.at);
    if (!status) {
        const ModelConfig *cfg = &m->cfg;
        long long KVC = dimension(cfg, DIM_KV);
        m->kcache = own_alloc(m, sizeof(float) * (size_t)key_cache_size(cfg));
        m->vcache = own_alloc(m, sizeof(float) * (size_t)cfg->num_layers * cfg->max_T * KVC);
        m->logits = own_alloc(m, sizeof(float) * (size_t)(cfg->V > cfg->C ? cfg->V : cfg->C));
        m->probs = own_alloc(m, sizeof(double) * (size_t)cfg->V);
        m->scratch = own_alloc(m, sizeof(double) * (size_t)cfg->V);
        m->order = own_alloc(m, sizeof(int) * (size_t)cfg->V);
        if (!m->kcache || !m->vcache || !m->logits || !m->probs || !m->scratch || !m->order)
            status = fail(e, "out of memory");
    }
    if (!status && !(m->file = sqlite3_mprintf("%s", file_of(x)))) status = fail(e, "out of memory");
    if (status) {
        model_free(m);
        return NULL;
    }
    return m;
}

/* The connection's model, loaded on first use and again after a new checkpoint. */
/* The model as the database holds it: the same one again when no new
 * checkpoint (and no other file) is there, else read afresh. A trainer
 * that commits while it is read makes it read again: the reads of one
 * call are separate statements, each with its own snapshot. */
Model *model_of(Ext *x, Err *e) {
    sqlite3_int64 step = latest_step(x, e);
    if (x->model && (step == x->model->step || step == -2) &&
        !strcmp(file_of(x), x->model->file))
        return x->model;  /* (a step that cannot be read now, busy say, keeps the model) */
    model_free(x->model);
    x->model = NULL;
    for (int attempt = 0; attempt < 5 && !x->model; attempt++) {
        sqlite3_int64 before = data_version(x);
        Model *m = load(x, e);
        if (m && before == data_version(x)) {
            x->model = m;
        } else if (m) {
            model_free(m);  /* a checkpoint came in meanwhile: read it whole */
        } else {
            return NULL;
        }
    }
    if (!x->model) fail(e, "the model kept changing while it was read (a trainer writing?)");
    return x->model;
}
