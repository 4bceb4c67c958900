"""A soak of sqlgpt serve: many requests from concurrent clients, some
cancelled mid-stream, many malformed, then checks that nothing leaked.

    python benchmarks/serve_soak.py [--requests 1000] [--clients 16] [--db model.db]

Each request is drawn at random: a greedy completion or chat (streamed or
not), one cancelled after its first chunks (a quarter of all), or a bad one
(malformed JSON, a body over the limit, max_tokens of -1 or 10^12, an
unknown model, a wrong key). Afterwards: no answer was a 5xx, no slot or
queue place is still held (/metrics back to 0), the server's resident
memory grew by less than GROWTH_LIMIT, and every completed answer equals
the same request served alone. Prints a summary and exits 1 if a check
fails.
"""
import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import CORPUS, make_model  # noqa: E402

KEY = "soak-key"
GROWTH_LIMIT = 0.25   # of the resident memory after warming up
WORDS = CORPUS.read_text().split()[:2000]


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def good_request(rng):
    """(path, body) of a greedy request whose answer is checked later."""
    words = " ".join(rng.sample(WORDS, rng.randint(1, 12)))
    stream = rng.random() < 0.5
    if rng.random() < 0.5:
        return "/v1/completions", {"model": "m", "prompt": words, "max_tokens": rng.randint(1, 24),
                                   "temperature": 0, "stream": stream}
    return "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": words}],
                                    "max_tokens": rng.randint(1, 24), "temperature": 0,
                                    "stream": stream}


BAD = [("malformed", lambda: b"{\"model\": \"m\", \"prompt\": "),
       ("huge", lambda: b"x" * (9 << 20)),
       ("negative", lambda: json.dumps({"model": "m", "prompt": "a", "max_tokens": -1})),
       ("absurd", lambda: json.dumps({"model": "m", "prompt": "a", "max_tokens": 10**12})),
       ("unknown model", lambda: json.dumps({"model": "nope", "prompt": "a"})),
       ("wrong key", lambda: json.dumps({"model": "m", "prompt": "a"}))]


async def answer(client, url, path, body):
    """(status, text) of a request, streamed or not."""
    headers = {"Authorization": f"Bearer {KEY}"}
    if not body.get("stream"):
        r = await client.post(url + path, json=body, headers=headers, timeout=600)
        if r.status_code != 200:
            return r.status_code, None
        choice = r.json()["choices"][0]
        return 200, choice.get("text", (choice.get("message") or {}).get("content"))
    text = ""
    async with client.stream("POST", url + path, json=body, headers=headers, timeout=600) as r:
        if r.status_code != 200:
            return r.status_code, None
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = (json.loads(line[6:])["choices"] or [{}])[0]
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return 200, text


async def cancelled(client, url, rng):
    path, body = good_request(rng)
    body.update(stream=True, max_tokens=200, temperature=1.0)
    async with client.stream("POST", url + path, json=body,
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as r:
        async for _ in r.aiter_lines():
            break  # the client goes away after the first line
    return r.status_code


async def soak(url, requests, clients, seed):
    import httpx
    rng = random.Random(seed)
    plan = []
    for _ in range(requests):
        roll = rng.random()
        plan.append("cancel" if roll < 0.25 else "bad" if roll < 0.45 else "good")
    statuses, kinds, done = Counter(), Counter(), []
    queue = list(enumerate(plan))

    async def worker(client, wrng):
        while queue:
            _, kind = queue.pop()
            if kind == "cancel":
                statuses[await cancelled(client, url, wrng)] += 1
            elif kind == "bad":
                name, make = wrng.choice(BAD)
                key = "wrong" if name == "wrong key" else KEY
                r = await client.post(url + "/v1/completions", content=make(), timeout=600,
                                      headers={"Authorization": f"Bearer {key}",
                                               "Content-Type": "application/json"})
                statuses[r.status_code] += 1
                kinds[(name, r.status_code)] += 1
            else:
                path, body = good_request(wrng)
                status, text = await answer(client, url, path, body)
                statuses[status] += 1
                if status == 200:
                    done.append((path, body, text))

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as client:
        await asyncio.gather(*(worker(client, random.Random(seed * 100 + i))
                               for i in range(clients)))
    return statuses, kinds, done


async def alone(url, done):
    import httpx
    async with httpx.AsyncClient() as client:
        return [await answer(client, url, path, body) for path, body, _ in done]


async def metric(url, name):
    import httpx
    async with httpx.AsyncClient() as client:
        text = (await client.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--db", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db = args.db or make_model("llama-baby", folder)
        proc = subprocess.Popen([sys.executable, "-m", "sqlgpt.cli", "serve", "--db", str(db),
                                 "--alias", "m", "--port", "0", "--slots", "8", "--api-key", KEY,
                                 "--queue", "1000"], stderr=subprocess.PIPE, text=True,
                                cwd=folder)
        url = next(line for line in proc.stderr if line.startswith("serving")) \
            .split(" at ")[1].split("/v1")[0]
        try:
            asyncio.run(soak(url, 50, 4, args.seed + 1))  # warm up: caches, allocations
            before = rss_kb(proc.pid)
            start = time.perf_counter()
            statuses, kinds, done = asyncio.run(soak(url, args.requests, args.clients, args.seed))
            seconds = time.perf_counter() - start
            time.sleep(0.5)
            after = rss_kb(proc.pid)
            busy = asyncio.run(metric(url, "sqlgpt_slots_busy"))
            waiting = asyncio.run(metric(url, "sqlgpt_queue_length"))
            again = asyncio.run(alone(url, done))
        finally:
            proc.terminate()
            proc.wait()
    mismatched = sum(a != (200, text) for a, (_, _, text) in zip(again, done))
    checks = {"no 5xx": not any(s >= 500 for s in statuses),
              "slots and queue back to 0": busy == 0 and waiting == 0,
              f"memory grew under {GROWTH_LIMIT:.0%}": after <= before * (1 + GROWTH_LIMIT),
              "every answer equals the request served alone": mismatched == 0}
    print(f"{args.requests} requests from {args.clients} clients in {seconds:.1f} s; statuses "
          f"{dict(sorted(statuses.items()))}; bad ones {dict(sorted(kinds.items()))}")
    print(f"{len(done)} answers checked alone, {mismatched} differ; resident memory "
          f"{before / 1024:.0f} MB -> {after / 1024:.0f} MB; busy slots {busy:g}, queue "
          f"{waiting:g}")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
