"""A client of the loadable extension with nothing but the standard library,
run by a Python whose sqlite3 can load extensions (the extension tests'
driver: sqlgpt itself need not be importable here).

usage: python extension_client.py JOB.json
JOB: {"ext": path, "runs": [{"db": path, "setup": [sql, ...], "queries": [sql, ...],
                             "threads": 0, "interrupt_after": seconds}]}
prints one JSON list per run: each query's first column, or {"error": message};
with threads N > 0, N threads run every query of the run at once on one
connection, and each thread's list is returned; with interrupt_after, the
connection is interrupted that many seconds after the queries start, and
the run's list ends with how many seconds the queries took.
"""
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path


def value(v):
    if isinstance(v, bytes):
        return {"blob": v.hex()}
    if isinstance(v, float) and v != v:
        return {"nan": True}
    return v


def run_queries(conn, queries):
    """Each query's first column; "-- touch PATH" creates PATH and "-- wait
    PATH" waits for it (so a test can change the database between queries)."""
    out = []
    for sql in queries:
        if sql.startswith(("-- touch ", "-- wait ")):
            path = Path(sql.split(" ", 2)[2])
            if sql.startswith("-- touch "):
                path.touch()
            while not path.exists():
                time.sleep(0.01)
            out.append(None)
            continue
        try:
            row = conn.execute(sql).fetchone()
            out.append(value(row[0]) if row else None)
        except sqlite3.Error as e:
            out.append({"error": str(e)})
    return out


def run(ext, spec):
    conn = sqlite3.connect(spec["db"], check_same_thread=False)
    conn.enable_load_extension(True)
    conn.load_extension(ext)
    for sql in spec.get("setup", []):
        try:
            conn.execute(sql).fetchall()
        except sqlite3.Error as e:
            return [{"error": str(e)}] * len(spec["queries"])
    threads = spec.get("threads", 0)
    if "interrupt_after" in spec:
        threading.Timer(spec["interrupt_after"], conn.interrupt).start()
        start = time.perf_counter()
        result = run_queries(conn, spec["queries"]) + [time.perf_counter() - start]
    elif not threads:
        result = run_queries(conn, spec["queries"])
    else:
        result = [None] * threads

        def work(i):
            result[i] = run_queries(conn, spec["queries"])
        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    conn.close()
    return result


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    print(json.dumps([run(job["ext"], spec) for spec in job["runs"]]))
