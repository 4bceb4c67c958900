"""Benchmark every tokenizer kind on a generated corpus: build time, encode
speed and peak memory.

    python benchmarks/tokenize_bench.py [--mb 100] [--small-mb 10] [--train-mb 10]
                                        [--kinds word,char,byte,bpe] [--bpe-vocab 8192]
                                        [--word-vocab 10000] [--markdown] [--out results.json]

The corpus: the words of examples/tinyshakespeare.txt as they appear there
(capitals and punctuation kept), drawn by a Zipf law over their frequency
ranks, 4 to 16 words a line, about one line in five ending a paragraph (a
blank line after it); --mb megabytes of it in a temporary file.

Each measurement runs in a fresh subprocess (this script with --child) so its
peak RSS (VmHWM) is its own: build the tokenizer on the corpus's first
--train-mb MB, then stream the first N MB through encode_chunks in ~1 MB
chunks cut where the corpus reader cuts (right after a "\\n" followed by
non-whitespace), counting the tokens and keeping none. N is --small-mb and
--mb, side by side: the same peak at both sizes shows that memory stays flat
as the corpus grows. Encode MB/s includes reading and decoding the file.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tables import render  # benchmarks/ is sys.path[0] as a script

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tinyshakespeare.txt"
MB = 2**20
WS = b" \t\n\x0b\x0c\r"
CHILD_TIMEOUT_S = 3600


def generate(path, mb, seed=0):
    """mb MB of Zipf-distributed example words in lines and paragraphs."""
    counts = Counter(re.findall(r"\S+", EXAMPLE.read_text()))
    words = np.array([w for w, _ in counts.most_common()], dtype=object)
    p = 1.0 / np.arange(1, len(words) + 1)  # Zipf: the k-th most frequent word has weight 1/k
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w") as f:
        while written < mb * MB:
            drawn = words[rng.choice(len(words), size=200_000, p=p / p.sum())]
            ends = np.cumsum(rng.integers(4, 17, size=len(drawn) // 4))
            ends = ends[ends <= len(drawn)]
            breaks = np.where(rng.random(len(ends)) < 0.2, "\n\n", "\n")
            block = "".join(" ".join(drawn[a:b]) + e
                            for a, b, e in zip([0, *ends[:-1]], ends, breaks))
            f.write(block)
            written += len(block)
    return written


def last_boundary(buf):
    """Where the corpus reader may cut buf: right after its last b"\\n" that
    is followed by a byte that is not whitespace (0: nowhere)."""
    i = buf.rfind(b"\n", 0, len(buf) - 1)
    while i >= 0 and buf[i + 1] in WS:
        i = buf.rfind(b"\n", 0, i)
    return i + 1


def read_chunks(path, limit, size=MB):
    """The file's first `limit` bytes (rounded up to a whole block) as str
    chunks of about `size` bytes, each cut at last_boundary."""
    with open(path, "rb") as f:
        rest, read = b"", 0
        while read < limit:
            block = f.read(size)
            if not block:
                break
            read += len(block)
            buf = rest + block
            cut = last_boundary(buf)
            rest = buf[cut:]
            if cut:
                yield buf[:cut].decode()
        if rest:
            yield rest.decode()


def peak_rss_mb():
    """This process's peak resident set so far (Linux: VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s*(\d+) kB", status, re.M).group(1)) / 1024


def child(kind, corpus, train_mb, encode_mb, vocab_size):
    """One measurement, in its own process: build, then stream-encode."""
    sys.path.insert(0, str(ROOT))
    from sqlgpt.data.tokenizers import TOKENIZERS
    base = peak_rss_mb()
    t = time.perf_counter()
    tok = TOKENIZERS[kind].build(read_chunks(corpus, train_mb * MB), vocab_size)
    build_s = time.perf_counter() - t
    after_build = peak_rss_mb()
    n_bytes = min(os.path.getsize(corpus), encode_mb * MB)
    t, n_tokens = time.perf_counter(), 0
    for ids in tok.encode_chunks(read_chunks(corpus, encode_mb * MB)):
        n_tokens += len(ids)
    encode_s = time.perf_counter() - t
    return dict(kind=kind, n_ids=tok.n_ids, build_s=build_s, encode_mb=n_bytes / MB,
                encode_mb_s=n_bytes / MB / encode_s, tokens=n_tokens, base_rss_mb=base,
                build_rss_mb=after_build, peak_rss_mb=peak_rss_mb())


def measure(kind, corpus, train_mb, encode_mb, vocab_size):
    cmd = [sys.executable, __file__, "--child", kind, "--corpus", str(corpus),
           "--train-mb", str(train_mb), "--mb", str(encode_mb), "--vocab", str(vocab_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} at {encode_mb} MB failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results, args, markdown):
    small, full = f"{args.small_mb:g} MB", f"{args.mb:g} MB"
    header = ["kind", "ids", f"build s ({args.train_mb:g} MB)", "tokens/KB",
              f"MB/s {small}", f"MB/s {full}", "RSS built", f"peak {small}", f"peak {full}"]
    rows = []
    for kind, (s, f) in results.items():
        rows.append([kind, f"{f['n_ids']:,}", f"{f['build_s']:.2f}",
                     f"{f['tokens'] / f['encode_mb'] / 1024:.0f}",
                     f"{s['encode_mb_s']:.1f}", f"{f['encode_mb_s']:.1f}",
                     f"{f['build_rss_mb']:.0f}", f"{s['peak_rss_mb']:.0f}",
                     f"{f['peak_rss_mb']:.0f}"])
    base = min(r["base_rss_mb"] for pair in results.values() for r in pair)
    return "\n".join([render(header, rows, markdown), "",
                      f"RSS in MB (python with numpy and tokenizers loaded: {base:.0f}); "
                      f"{os.cpu_count()} CPUs"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=100, help="corpus size in MB")
    p.add_argument("--small-mb", type=float, default=10, help="the smaller encode size, in MB")
    p.add_argument("--train-mb", type=float, default=10, help="MB the tokenizers are built on")
    p.add_argument("--kinds", default="word,char,byte,bpe", help="comma-separated kinds")
    p.add_argument("--bpe-vocab", type=int, default=8192, help="bpe vocab size (all ids)")
    p.add_argument("--word-vocab", type=int, default=10000, help="words the word tokenizer keeps")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    p.add_argument("--out", type=Path, help="write every result as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.corpus, args.train_mb, args.mb, args.vocab)))
        return
    vocab = {"word": args.word_vocab, "char": 0, "byte": 0, "bpe": args.bpe_vocab}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        t = time.perf_counter()
        size = generate(corpus, args.mb)
        print(f"corpus: {size / MB:.1f} MB in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        results = {}
        for kind in args.kinds.split(","):
            results[kind] = [measure(kind, corpus, args.train_mb, mb, vocab[kind])
                             for mb in (args.small_mb, args.mb)]
            print(f"{kind}: done", file=sys.stderr)
    print(report(results, args, markdown=False))
    if args.markdown:
        print()
        print(report(results, args, markdown=True))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
