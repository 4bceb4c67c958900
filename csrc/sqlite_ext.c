/* sqlgpt as a loadable SQLite extension (sqlgpt0.so, entry point
 * sqlite3_sqlgpt_init): sqlgpt_generate, sqlgpt_tokens, sqlgpt_logprob and
 * sqlgpt_embed over the model stored in a database, with the kernel's own
 * decode step and no Python. The model is read through SQL on the host's
 * connection (or, for sqlgpt_model('file.db'), a read-only one of its own),
 * checked as the Python loader checks it (schema, shapes, CRC-32 of every
 * row, finite values), and kept per connection until a new checkpoint.
 * Every failure is a SQL error with a message; nothing aborts. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sqlite3ext.h>
SQLITE_EXTENSION_INIT1
#include "ext_sql.h"

#ifdef SQLITE_DIRECTONLY
#define DIRECT_ONLY SQLITE_DIRECTONLY
#else  /* SQLite before 3.30, which cannot keep a function out of schemas */
#define DIRECT_ONLY 0
#endif

/* sqlgpt_model(name [, precision [, prefix]]): the model the functions use
 * from now on: an attached schema's ('main' is the connection's own file)
 * or a database file's; precision one of contract.PRECISIONS. Returns name, after
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
    int n_precisions = (int)(sizeof(PRECISIONS) / sizeof(*PRECISIONS));
    int code = choose(precision, PRECISIONS, n_precisions);  /* PRECISION_* */
    if (code < 0) {
        sqlite3_result_error(ctx, "sqlgpt_model: precision is fp32, bf16, f16, int8 or int4", -1);
        return;
    }
    char lower[SQLGPT_PREFIX_MAX + 1];
    if (!prefix || check_prefix(prefix, lower)) {
        sqlite3_result_error(ctx, "sqlgpt_model: bad prefix: use letters, digits and _ "
                                  "(starting with a letter, not 'sqlite'), e.g. gpt_", -1);
        return;
    }
    sqlite3_mutex_enter(x->mutex);
    if (x->busy) {
        sqlite3_mutex_leave(x->mutex);
        sqlite3_result_error(ctx, "sqlgpt_model: called while another sqlgpt call on this "
                                  "connection runs", -1);
        return;
    }
    int is_schema = 0;
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(x->db, "SELECT 1 FROM pragma_database_list WHERE name = ?", -1, &s,
                           NULL) == SQLITE_OK) {
        sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
        is_schema = sqlite3_step(s) == SQLITE_ROW;
        sqlite3_finalize(s);
    }
    sqlite3 *own = NULL;
    Ext chosen = *x;
    snprintf(chosen.schema, sizeof(chosen.schema), "%s", is_schema ? name : "main");
    snprintf(chosen.prefix, sizeof(chosen.prefix), "%s", lower);
    chosen.precision = code;
    if (!is_schema) {
        /* one text for every file that is no model it can read: missing,
         * unreadable, not a database or another app's, so that a call
         * cannot probe which paths exist */
        int opened = sqlite3_open_v2(name, &own, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK;
        chosen.own = own;
        if (!opened || schema_version(&chosen, &e) == NO_MODEL) {
            snprintf(e.text, sizeof(e.text), "sqlgpt_model: %s is no sqlgpt model this can read",
                     name);
            sqlite3_close(own);
            own = chosen.own = NULL;
        } else {
            e.text[0] = 0;
        }
    }
    if (!e.text[0]) {
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

/* Each registered function's destructor: the last one frees the state. */
static void ext_free(void *p) {
    Ext *x = p;
    if (--x->refs > 0) return;
    model_free(x->model);
    if (x->own) sqlite3_close(x->own);
    sqlite3_mutex_free(x->mutex);
    free(x);
}

/* the one symbol the library exports (it is built -fvisibility=hidden): a
 * process that also holds sqlgpt's Python kernel, or another build of this
 * extension, never binds one's functions to the other's */
#ifdef _WIN32
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
int sqlite3_sqlgpt_init(sqlite3 *db, char **error, const sqlite3_api_routines *api) {
    SQLITE_EXTENSION_INIT2(api);
    Ext *x = calloc(1, sizeof(Ext));
    /* a SQLite built without threads has no mutexes (NULL, whose enter and
     * leave do nothing), and no threads to keep apart */
    /* recursive: SQL a call runs may call sqlgpt again (a view), which must
     * find the state busy, not wait on itself */
    if (x) x->mutex = sqlite3_mutex_alloc(SQLITE_MUTEX_RECURSIVE);
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
        {"sqlgpt_chat", 1, sqlgpt_chat}, {"sqlgpt_chat", 2, sqlgpt_chat},
        {"sqlgpt_chat", 3, sqlgpt_chat}, {"sqlgpt_chat", 4, sqlgpt_chat},
        {"sqlgpt_tokens", 1, sqlgpt_tokens}, {"sqlgpt_logprob", 1, sqlgpt_logprob},
        {"sqlgpt_embed", 1, sqlgpt_embed}, {"sqlgpt_classify", 1, sqlgpt_classify},
        {"sqlgpt_classify_scores", 1, sqlgpt_classify_scores}, {"sqlgpt_model", 1, sqlgpt_model},
        {"sqlgpt_model", 2, sqlgpt_model}, {"sqlgpt_model", 3, sqlgpt_model}};
    int n = (int)(sizeof(fns) / sizeof(fns[0]));
    x->refs = 1;  /* this function's, until every registration holds its own */
    for (int i = 0; i < n; i++) {
        /* each registration holds x; SQLite releases it when the function is
         * replaced, when the connection closes, or when registering fails */
        x->refs++;
        /* sqlgpt_model opens files: only SQL the host runs itself may call it,
         * never a view or trigger in a database it opens */
        int flags = SQLITE_UTF8 | (fns[i].fn == sqlgpt_model ? DIRECT_ONLY : 0);
        int rc = sqlite3_create_function_v2(db, fns[i].name, fns[i].nargs, flags, x,
                                            fns[i].fn, NULL, NULL, ext_free);
        if (rc != SQLITE_OK) {
            *error = sqlite3_mprintf("sqlgpt: cannot register %s", fns[i].name);
            ext_free(x);
            return rc;
        }
    }
    ext_free(x);  /* the registrations hold it now */
    return SQLITE_OK;
}
