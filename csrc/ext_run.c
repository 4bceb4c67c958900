/* The loadable extension's SQL functions: sqlgpt_generate, sqlgpt_chat,
 * sqlgpt_tokens, sqlgpt_logprob and sqlgpt_embed, each a decode of the connection's model
 * with its arguments checked, every failure a SQL error. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "ext_sql.h"

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

int decode_hidden(Model *m, const int *tokens, int n, int n_out, float *out, Err *e) {
    return run(m, tokens, n, 0, n_out, HIDDEN, out, e);
}

/* The host asked (sqlite3_interrupt) for the statement to stop: checked
 * between a call's decode steps. SQLite 3.41 and later say so directly;
 * before, a one-row statement on the host's connection is refused with
 * SQLITE_INTERRUPT while it is interrupted (asked at most every PROBE_NS,
 * so that it costs nothing next to the decode steps between). */
#define PROBE_NS 5000000LL
static int interrupted(const Ext *x, Err *e) {
#ifdef sqlite3_is_interrupted
    if (sqlite3_is_interrupted(x->db)) return fail(e, "interrupted");
#else
    static __thread long long last;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ns = (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
    if (ns - last < PROBE_NS) return 0;
    last = ns;
    sqlite3_stmt *s = NULL;
    int rc = sqlite3_prepare_v2(x->db, "SELECT 1", -1, &s, NULL);
    if (rc == SQLITE_OK) rc = sqlite3_step(s);
    sqlite3_finalize(s);
    if (rc == SQLITE_INTERRUPT) return fail(e, "interrupted");
#endif
    return 0;
}

/* ---- argument checks ---- */
const char *text_arg(sqlite3_value *v, const char *fn, const char *what, int *len,
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

void call(sqlite3_context *ctx, int argc, sqlite3_value **argv, const char *fn, Body body) {
    Ext *x = sqlite3_user_data(ctx);
    Err e = {{0}};
    sqlite3_mutex_enter(x->mutex);
    int status = -1;
    if (x->busy) {
        fail(&e, "called while another sqlgpt call on this connection runs (from a view or "
                 "trigger?)");
    } else {
        x->busy = 1;
        Model *m = model_of(x, &e);
        status = m ? body(ctx, x, m, argc, argv, &e) : -1;
        x->busy = 0;
    }
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
    for (int i = 0; i < ids.n && !status; i++) {
        /* the digits by hand: snprintf cost as much as encoding the text */
        char number[16];
        int at = sizeof(number);
        for (unsigned v = (unsigned)ids.ids[i]; at == sizeof(number) || v; v /= 10)
            number[--at] = (char)('0' + v % 10);
        if (i) number[--at] = ' ', number[--at] = ',';
        status = buf_add(&out, number + at, sizeof(number) - (size_t)at);
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

/* max_tokens, temperature and seed from argv[first..] (sqlgpt_generate's
 * and sqlgpt_chat's optional arguments), checked; a seed drawn if none. */
static int sampling_args(sqlite3_value **argv, int argc, int first, const char *fn,
                         sqlite3_int64 *max_tokens, double *temperature, sqlite3_int64 *seed,
                         Err *e) {
    *max_tokens = DEFAULT_MAX_TOKENS, *temperature = 1.0, *seed = -1;
    if (argc > first && int_arg(argv[first], fn, "max_tokens", 0, MAX_TOKENS, max_tokens, e))
        return -1;
    if (argc > first + 1) {
        int type = sqlite3_value_type(argv[first + 1]);
        *temperature = sqlite3_value_double(argv[first + 1]);
        if ((type != SQLITE_INTEGER && type != SQLITE_FLOAT) || !(*temperature >= 0) ||
            *temperature > 100)
            return fail(e, "%s: temperature must be a number from 0 to 100", fn);
    }
    if (argc > first + 2 && sqlite3_value_type(argv[first + 2]) != SQLITE_NULL &&
        int_arg(argv[first + 2], fn, "seed", 0, INT64_MAX, seed, e))
        return -1;
    if (*seed < 0) sqlite3_randomness(sizeof(*seed), seed), *seed &= INT64_MAX;
    return 0;
}

/* Sample up to max_tokens ids after context (n_prompt ids, generate.Window's
 * sliding context), ending at end_id, and set the result to the text they
 * add (decoded with the prompt, so a character split across the boundary
 * stays whole). */
static int continue_text(sqlite3_context *ctx, Ext *x, Model *m, Ids *context,
                         sqlite3_int64 max_tokens, double temperature, sqlite3_int64 seed,
                         int end_id, Err *e) {
    Pcg64 rng;
    SamplerConfig sampler = {temperature, 1.0, 0.0, 1.0, 0};
    pcg64_seed(&rng, (uint64_t)seed);
    const Tokenizer *t = &m->tok;
    int banned[3], n_banned = 0;  /* Model._banned: <pad>, <bos>, <unk> */
    int candidates[3] = {t->pad_id, t->bos_id, t->unk_id};
    for (int i = 0; i < 3; i++)
        if (candidates[i] >= 0 && candidates[i] != t->eos_id) banned[n_banned++] = candidates[i];
    Buffer before = {0}, after = {0};
    int status = 0, n_prompt = context->n, T = m->cfg.max_T;
    int base = 0, pos = 0;  /* the KV cache holds context[base:base + pos] (generate.Window) */
    for (sqlite3_int64 step = 0; step < max_tokens && !(status = status || interrupted(x, e));
         step++) {
        if (context->n - base > T) base = context->n - (T / 2 > 1 ? T / 2 : 1), pos = 0;
        int rows = context->n - base - pos;
        status = run(m, context->ids + base + pos, rows, pos, 1, GENERATE, m->logits, e);
        pos += rows;
        if (status) break;
        int token = sample_token(m->logits, m->cfg.V, &sampler, NULL, 0, banned, n_banned, &rng,
                                 m->probs, m->scratch, m->order);
        if (token < 0) status = fail(e, "the model's logits are not finite");
        else if (token == end_id) break;
        else if (ids_push(context, token)) status = fail(e, "out of memory");
    }
    if (!status && (tok_decode(t, context->ids, n_prompt, &before) ||
                    tok_decode(t, context->ids, context->n, &after)))
        status = fail(e, "out of memory");
    if (!status) {
        if (after.n >= before.n && !memcmp(after.bytes, before.bytes, before.n)) {
            sqlite3_result_text(ctx, after.bytes + before.n, (int)(after.n - before.n),
                                SQLITE_TRANSIENT);
        } else {
            Buffer fresh = {0};
            if (tok_decode(t, context->ids + n_prompt, context->n - n_prompt, &fresh))
                status = fail(e, "out of memory");
            else sqlite3_result_text(ctx, fresh.bytes ? fresh.bytes : "", (int)fresh.n,
                                     SQLITE_TRANSIENT);
            buf_free(&fresh);
        }
    }
    buf_free(&before), buf_free(&after);
    return status;
}

static int generate_body(sqlite3_context *ctx, Ext *x, Model *m, int argc, sqlite3_value **argv,
                         Err *e) {
    const char *fn = "sqlgpt_generate";
    int len;
    sqlite3_int64 max_tokens, seed;
    double temperature;
    const char *prompt = text_arg(argv[0], fn, "prompt", &len, e);
    if (!prompt || sampling_args(argv, argc, 1, fn, &max_tokens, &temperature, &seed, e))
        return -1;
    Ids context = {0};
    int status = prompt_ids(m, prompt, len, &context, e) ||
                 continue_text(ctx, x, m, &context, max_tokens, temperature, seed,
                               m->tok.eos_id, e);
    ids_free(&context);
    return status;
}

/* sqlgpt_chat(messages [, max_tokens, temperature, seed]): the reply
 * Model.chat gives, for the templates the extension renders (ext_chat.c). */
static int chat_body(sqlite3_context *ctx, Ext *x, Model *m, int argc, sqlite3_value **argv,
                     Err *e) {
    const char *fn = "sqlgpt_chat";
    int len;
    sqlite3_int64 max_tokens, seed;
    double temperature;
    const char *messages = text_arg(argv[0], fn, "messages", &len, e);
    if (!messages || sampling_args(argv, argc, 1, fn, &max_tokens, &temperature, &seed, e))
        return -1;
    Ids context = {0};
    int end_id, status = chat_prompt(x, m, messages, &context, &end_id, e);
    if (!status && context.n >= m->cfg.max_T)
        status = fail(e, "the conversation is %d tokens; the model's context is %d: drop "
                         "earlier messages", context.n, m->cfg.max_T);
    status = status || continue_text(ctx, x, m, &context, max_tokens, temperature, seed, end_id,
                                     e);
    ids_free(&context);
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
    for (int window = 0; window <= last / stride + tail && !(status = status || interrupted(x, e));
         window++) {
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

void sqlgpt_generate(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_generate", generate_body);
}
void sqlgpt_chat(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_chat", chat_body);
}
void sqlgpt_tokens(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_tokens", tokens_body);
}
void sqlgpt_logprob(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_logprob", logprob_body);
}
void sqlgpt_embed(sqlite3_context *c, int n, sqlite3_value **v) {
    call(c, n, v, "sqlgpt_embed", embed_body);
}
