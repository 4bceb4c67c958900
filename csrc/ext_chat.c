/* sqlgpt_chat's conversation: the messages (a JSON array, read with
 * SQLite's own JSON functions) checked as sqlgpt.chat.template checks them,
 * rendered by the model's chat template when it is one of the fixed texts
 * contract.CHAT_TEMPLATES declares (sqlgpt's default, ChatML), and encoded
 * as sqlgpt.chat.conversation encodes a rendered conversation: the text of
 * a special token (<bos>, <eos>, an imported tokenizer's <|im_start|>, ...)
 * is its id, the rest is text. Any
 * other template needs Jinja: a SQL error that says so. */
#include <stdio.h>
#include <string.h>
#include "ext_sql.h"

enum { N_TEMPLATES = sizeof(CHAT_TEMPLATES) / sizeof(CHAT_TEMPLATES[0]),
       N_ROLES = sizeof(CHAT_ROLES) / sizeof(CHAT_ROLES[0]) };
enum { SQLGPT_TEMPLATE = 0 };  /* CHAT_TEMPLATE_NAMES[0]: "sqlgpt" */

int read_chat_template(const Ext *x, Model *m, Err *e) {
    sqlite3_stmt *s = prepare(x, e, "SELECT json_extract(value, '$') FROM \"%w\".\"%w%w\" "
                                    "WHERE key = 'chat_template'", "train_state");
    if (!s) return -1;
    m->chat = SQLGPT_TEMPLATE;  /* none stored: sqlgpt's default */
    if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_type(s, 0) == SQLITE_TEXT) {
        const char *text = (const char *)sqlite3_column_text(s, 0);
        if (text && text[0]) {
            m->chat = -1;
            for (int i = 0; i < N_TEMPLATES; i++)
                if (!strcmp(text, CHAT_TEMPLATES[i])) m->chat = i;
        }
    }
    sqlite3_finalize(s);
    return 0;
}

/* The text of the tokenizer's special id (as its vocab names it), or "". */
static const char *special_text(const Tokenizer *t, int id) {
    return id >= 0 && t->name[id] ? t->name[id] : "";
}

/* One message rendered onto out, as the template's text gives it. */
static int render_message(int chat, const Tokenizer *t, const char *role, const char *content,
                          int content_len, Buffer *out) {
    const char *bos = special_text(t, t->bos_id), *eos = special_text(t, t->eos_id);
    const char *open = chat == SQLGPT_TEMPLATE ? bos : "<|im_start|>";
    const char *close = chat == SQLGPT_TEMPLATE ? eos : "<|im_end|>\n";
    return buf_add(out, open, strlen(open)) || buf_add(out, role, strlen(role)) ||
           buf_add(out, "\n", 1) || buf_add(out, content, (size_t)content_len) ||
           buf_add(out, close, strlen(close));
}

/* The special token whose text is the longest to start text (n bytes), or -1. */
static int special_at(const Tokenizer *t, const char *text, size_t n) {
    int found = -1;
    size_t longest = 0;
    for (int id = 0; id < t->n_ids; id++) {
        size_t len = t->name[id] ? strlen(t->name[id]) : 0;
        if (len > longest && len <= n && !memcmp(text, t->name[id], len)) found = id, longest = len;
    }
    return found;
}

/* The ids of rendered text, each special token's text as its id (the
 * longest where several start at one place, as sqlgpt.chat.conversation). */
static int encode_specials(const Tokenizer *t, const char *text, size_t n, Ids *ids) {
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        int found = i < n ? special_at(t, text + i, n - i) : -1;
        if (found < 0 && i < n) continue;
        if (i > start && tok_encode(t, text + start, i - start, ids)) return -1;
        if (found >= 0) {
            if (ids_push(ids, found)) return -1;
            i += strlen(t->name[found]) - 1;
        }
        start = i + 1;
    }
    return 0;
}

/* Check and render the messages (JSON) onto out. */
static int render(const Ext *x, int chat, const Tokenizer *t, const char *messages, Buffer *out,
                  Err *e) {
    sqlite3_stmt *s = NULL;
    const char *sql = "SELECT json_type(value), json_type(value, '$.role'), "
                      "json_extract(value, '$.role'), json_type(value, '$.content'), "
                      "json_extract(value, '$.content'), json_valid(?1), "
                      "CASE WHEN json_valid(?1) THEN json_type(?1) END "
                      "FROM (SELECT 1) LEFT JOIN json_each(CASE WHEN json_valid(?1) THEN ?1 "
                      "ELSE '[]' END) ORDER BY key";
    if (sqlite3_prepare_v2(x->db, sql, -1, &s, NULL) != SQLITE_OK)
        return fail(e, "reading the messages needs SQLite's JSON functions: %s",
                    sqlite3_errmsg(x->db));
    sqlite3_bind_text(s, 1, messages, -1, SQLITE_STATIC);
    int status = 0, number = 0, rc;
    while (!status && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        const char *whole = (const char *)sqlite3_column_text(s, 6);
        if (!sqlite3_column_int(s, 5)) {
            status = fail(e, "messages is not JSON");
            break;
        }
        if (!whole || strcmp(whole, "array") || sqlite3_column_type(s, 0) == SQLITE_NULL) {
            status = fail(e, "messages must be a non-empty list of {\"role\", \"content\"} "
                             "objects");
            break;
        }
        number++;
        const char *kind = (const char *)sqlite3_column_text(s, 0);
        const char *role_type = (const char *)sqlite3_column_text(s, 1);
        const char *role = (const char *)sqlite3_column_text(s, 2);
        const char *content_type = (const char *)sqlite3_column_text(s, 3);
        int known = -1;
        for (int r = 0; r < N_ROLES && role_type && !strcmp(role_type, "text"); r++)
            if (role && !strcmp(role, CHAT_ROLES[r])) known = r;
        if (!kind || strcmp(kind, "object"))
            status = fail(e, "message %d is not an object with role and content", number);
        else if (known < 0)
            status = fail(e, "message %d has role %s%s%s: roles are system, user, assistant",
                          number, role_type && !strcmp(role_type, "text") ? "'" : "",
                          role ? role : "None", role_type && !strcmp(role_type, "text") ? "'" : "");
        else if (!content_type || strcmp(content_type, "text"))
            status = fail(e, "message %d (%s) has no text content", number, CHAT_ROLES[known]);
        else if (render_message(chat, t, CHAT_ROLES[known],
                                (const char *)sqlite3_column_text(s, 4),
                                sqlite3_column_bytes(s, 4), out))
            status = fail(e, "out of memory");
    }
    if (!status && rc != SQLITE_DONE)
        status = fail(e, "cannot read the messages: %s", sqlite3_errmsg(x->db));
    sqlite3_finalize(s);
    if (status) return status;
    const char *prompt = chat == SQLGPT_TEMPLATE ? special_text(t, t->bos_id) : "<|im_start|>";
    return buf_add(out, prompt, strlen(prompt)) || buf_add(out, "assistant\n", 10)
               ? fail(e, "out of memory") : 0;
}

int chat_prompt(const Ext *x, const Model *m, const char *messages, Ids *ids, int *end_id,
                Err *e) {
    const Tokenizer *t = &m->tok;
    if (m->chat < 0)
        return fail(e, "the model's chat template is not one the extension renders (sqlgpt's "
                       "default or ChatML): chat with it from Python (sqlgpt.register)");
    if (m->chat == SQLGPT_TEMPLATE && (t->bos_id < 0 || t->eos_id < 0))
        return fail(e, "the tokenizer has no <bos> and <eos> for sqlgpt's chat template: give "
                       "the model a template of its own");
    Buffer text = {0};
    int status = render(x, m->chat, t, messages, &text, e);
    if (!status && encode_specials(t, text.bytes, text.n, ids)) status = fail(e, "out of memory");
    buf_free(&text);
    /* the special right after a reply's text: <eos>, or ChatML's <|im_end|>
     * where the tokenizer has it (ChatFormat._end_id) */
    int end = m->chat == SQLGPT_TEMPLATE ? -1 : special_at(t, "<|im_end|>\n", 11);
    *end_id = end >= 0 ? end : t->eos_id;
    return status;
}
