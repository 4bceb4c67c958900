/* The extension's classifier functions: sqlgpt_classify (the label) and
 * sqlgpt_classify_scores (a JSON object of label: probability), as the
 * Python functions give them: the text cut to the context, its final
 * hidden states pooled (classify.c's pooling), then the head. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ext_sql.h"

int read_labels(const Ext *x, Model *m, Err *e) {
    int L = m->cfg.L;
    if (!L) return 0;
    m->labels = own_alloc(m, sizeof(char *) * (size_t)L);
    if (!m->labels) return fail(e, "out of memory");
    sqlite3_stmt *s = prepare(x, e, "SELECT id, name FROM \"%w\".\"%w%w\" ORDER BY id", "labels");
    if (!s) return -1;
    int n = 0, status = 0;
    while (!status && sqlite3_step(s) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(s, 1);
        if (n >= L || sqlite3_column_int64(s, 0) != n || !name ||
            sqlite3_column_type(s, 1) != SQLITE_TEXT) {
            status = -1;
            break;
        }
        size_t len = strlen(name) + 1;
        if (!(m->labels[n] = own_alloc(m, len))) status = fail(e, "out of memory");
        else memcpy(m->labels[n++], name, len);
    }
    sqlite3_finalize(s);
    if (!status && n != L) status = -1;
    if (status && !e->text[0])
        fail(e, "the labels table does not hold the classifier's %d labels: the file is "
                "damaged", L);
    return status;
}

/* probs (L) of the text in argv[0]: -1 with e set on a bad argument */
static int label_probs(Model *m, sqlite3_value *text, const char *fn, double *probs, Err *e) {
    if (!m->cfg.L || !m->labels)
        return fail(e, "the model is not a classifier (fine-tune one with --task classify)");
    int len;
    const char *chars = text_arg(text, fn, "text", &len, e);
    if (!chars) return -1;
    Ids ids = {0};
    if (tok_encode(&m->tok, chars, (size_t)len, &ids)) return ids_free(&ids), fail(e, "out of memory");
    int C = m->cfg.C, L = m->cfg.L, n = ids.n < m->cfg.max_T ? ids.n : m->cfg.max_T;
    if (!n) return ids_free(&ids), fail(e, "a classifier needs non-empty text to classify");
    int last = m->cfg.pool == POOL_LAST, rows = last ? 1 : n, status = 0;
    float *hidden = malloc(sizeof(float) * (size_t)rows * C), *logits = malloc(sizeof(float) * L);
    float pooled[C];
    if (!hidden || !logits) status = fail(e, "out of memory");
    if (!status) status = decode_hidden(m, ids.ids, n, rows, hidden, e);
    if (!status) {
        int one = rows;  /* the pooled rows' length: all of them, or the one last state */
        pool_forward(pooled, hidden, &one, 1, rows, C, last ? POOL_LAST : POOL_MEAN);
        if (classify_forward(logits, NULL, NULL, pooled, m->cls_w, m->cls_b, NULL, 1, C, L, -1))
            status = fail(e, "out of memory");
    }
    if (!status) {  /* softmax in double, as the Python side computes it */
        double top = logits[0], sum = 0.0;
        for (int j = 1; j < L; j++) top = logits[j] > top ? logits[j] : top;
        for (int j = 0; j < L; j++) sum += probs[j] = exp((double)logits[j] - top);
        for (int j = 0; j < L; j++) probs[j] /= sum;
    }
    free(hidden), free(logits);
    ids_free(&ids);
    return status;
}

/* s as a JSON string onto out (escaped as Python's json.dumps does) */
static int json_string(Buffer *out, const char *s) {
    int status = buf_add(out, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p && !status; p++) {
        char esc[8];
        if (*p == '"' || *p == '\\') snprintf(esc, sizeof(esc), "\\%c", *p);
        else if (*p < 0x20) snprintf(esc, sizeof(esc), "\\u%04x", *p);
        else esc[0] = (char)*p, esc[1] = 0;
        status = buf_add(out, esc, strlen(esc));
    }
    return status || buf_add(out, "\"", 1);
}

/* The most probable label (scores 0), or every label's probability as a
 * JSON object (scores 1), of the text in argv[0]. */
static int label_result(sqlite3_context *ctx, Model *m, sqlite3_value **argv, const char *fn,
                        int scores, Err *e) {
    double *probs = malloc(sizeof(double) * (size_t)(m->cfg.L > 0 ? m->cfg.L : 1));
    if (!probs) return fail(e, "out of memory");
    int status = label_probs(m, argv[0], fn, probs, e), best = 0;
    Buffer out = {0};
    for (int j = 1; j < m->cfg.L && !status; j++)  /* the first of equals, as argmax */
        best = probs[j] > probs[best] ? j : best;
    for (int j = 0; j < m->cfg.L && !status && scores; j++) {
        char number[40];
        snprintf(number, sizeof(number), ": %.17g", probs[j]);
        if (buf_add(&out, j ? ", " : "{", j ? 2 : 1) || json_string(&out, m->labels[j]) ||
            buf_add(&out, number, strlen(number)))
            status = fail(e, "out of memory");
    }
    if (!status && scores && buf_add(&out, "}", 1)) status = fail(e, "out of memory");
    if (!status && scores) sqlite3_result_text(ctx, out.bytes, (int)out.n, SQLITE_TRANSIENT);
    else if (!status) sqlite3_result_text(ctx, m->labels[best], -1, SQLITE_TRANSIENT);
    buf_free(&out);
    free(probs);
    return status;
}

static int classify_body(sqlite3_context *ctx, Ext *x, Model *m, int argc, sqlite3_value **argv,
                         Err *e) {
    (void)x, (void)argc;
    return label_result(ctx, m, argv, "sqlgpt_classify", 0, e);
}

static int scores_body(sqlite3_context *ctx, Ext *x, Model *m, int argc, sqlite3_value **argv,
                       Err *e) {
    (void)x, (void)argc;
    return label_result(ctx, m, argv, "sqlgpt_classify_scores", 1, e);
}

void sqlgpt_classify(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_classify", classify_body);
}
void sqlgpt_classify_scores(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_classify_scores", scores_body);
}
