"""A small app that keeps its notes in SQLite and calls a sqlgpt model from
its own SQL: it writes a continuation of every note into its `summary`
column, then ranks the notes by how close their embeddings are to a query.

    sqlgpt train examples/tinyshakespeare.txt --db model.db --iters 300
    python examples/notes_app.py --model model.db --db notes.db --query "the king"
"""
import argparse
import sqlite3

import sqlgpt

NOTES = [
    "the king is dead, long live the king",
    "my lord, the queen would speak with you",
    "what light through yonder window breaks",
    "to be, or not to be, that is the question",
    "the quality of mercy is not strained",
    "friends, romans, countrymen, lend me your ears",
]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a sqlgpt database")
    p.add_argument("--db", default="notes.db", help="the app's own database")
    p.add_argument("--query", default="the queen and the king")
    args = p.parse_args()

    with sqlite3.connect(args.db) as setup:  # the app's own table, created as any app would
        setup.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT, "
                      "summary TEXT)")
        if not setup.execute("SELECT count(*) FROM notes").fetchone()[0]:
            setup.executemany("INSERT INTO notes (body) VALUES (?)", [(n,) for n in NOTES])

    # sqlite-vec loaded (vec_distance_cosine), and sqlgpt's functions for the model
    conn = sqlgpt.connect(args.db, readonly=False, functions=False)
    sqlgpt.register(conn, args.model)

    conn.execute("UPDATE notes SET summary = sqlgpt_generate(body, 12, 0.8, id)")
    print("summaries:")
    for body, summary in conn.execute("SELECT body, summary FROM notes ORDER BY id").fetchall():
        print(f"  {body!r} -> {summary!r}")

    print(f"closest to {args.query!r}:")
    rows = conn.execute("""
        SELECT body, vec_distance_cosine(sqlgpt_embed(body), sqlgpt_embed(?)) AS distance
        FROM notes ORDER BY distance LIMIT 3""", (args.query,)).fetchall()
    for body, distance in rows:
        print(f"  {distance:.4f}  {body}")
    conn.close()


if __name__ == "__main__":
    main()
