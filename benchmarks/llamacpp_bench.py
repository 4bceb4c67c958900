"""sqlgpt against llama.cpp on the same GGUF files: prompt processing (pp512)
and generation (tg128) tokens/s on 2 threads, in one run.

    python benchmarks/llamacpp_bench.py --llama-cpp LLAMA_CPP/build/bin
                                        [--shapes stories15M,smollm2-135M,qwen2.5-0.5B]
                                        [--formats f32,f16,q8_0,q4_0] [--markdown]

For each shape (random weights: speed does not depend on them) and tensor
format, a GGUF file is written as llama.cpp's converter lays one out (with
sqlgpt's exporter's layout; Q4_0 and F16 blocks by the gguf package), run
by llama.cpp's own llama-bench (-p 512 -n 128 -t 2), and imported with
`sqlgpt import`, which keeps each tensor in the file's precision (Q8_0/Q4_0
blocks as its int8/int4 rows, F16 as half rows). sqlgpt then runs a 512-token prompt in one
decode step (pp512) and generates 128 tokens greedily from one token (tg128,
as llama-bench's tg starts from an empty cache), in
the precision the file holds (fp32 for F32, f16 for F16, int8 for Q8_0, int4
for Q4_0), each the median of ROUNDS. The import's seconds, the load's
(reading the file into the decoder) and the sqlgpt process's peak resident
memory are reported too. llama.cpp is not a
dependency: point --llama-cpp at a build's bin folder (cmake --build build
--target llama-bench).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tables import render  # noqa: E402

SHAPES = {  # ArchConfig fields of the real models' shapes
    "stories15M": dict(preset="llama", n_vocab=32000, embed_dim=288, num_heads=6,
                       num_layers=6, ffn_dim=768, seq_len=1024),
    "smollm2-135M": dict(preset="llama", n_vocab=49152, embed_dim=576, num_heads=9,
                         kv_heads=3, num_layers=30, ffn_dim=1536, seq_len=1024,
                         tie_weights=True),
    "qwen2.5-0.5B": dict(preset="llama", n_vocab=151936, embed_dim=896, num_heads=14,
                         kv_heads=2, num_layers=24, ffn_dim=4864, seq_len=1024,
                         tie_weights=True, qkv_bias=True, rope_theta=1e6),
}
FORMATS = ("f32", "f16", "q8_0", "q4_0")
PRECISION = {"f32": "fp32", "f16": "f16", "q8_0": "int8", "q4_0": "int4"}
PROMPT, NEW = 512, 128
ROUNDS = 3


def synthetic_vocab(n):
    """n byte-level BPE tokens and the merges that make them: the 256 bytes,
    then each new token two earlier ones joined (all distinct)."""
    from sqlgpt.data.tokenizers.bpe import BYTE_CHARS
    tokens, merges, seen = list(BYTE_CHARS), [], set(BYTE_CHARS)
    i = 0
    while len(tokens) < n:
        a, b = tokens[i % 256], tokens[(i * 7 + 3) % len(tokens)]
        i += 1
        if a + b in seen or len(a + b) > 16:
            continue
        tokens.append(a + b)
        merges.append(f"{a} {b}")
        seen.add(a + b)
    return tokens, merges


def write_gguf(path, arch, fmt, rng):
    """A GGUF of random weights for arch, in fmt, laid out as sqlgpt's
    exporter (and llama.cpp's converter) lays it out."""
    import gguf
    from sqlgpt.interop.gguf_export import _metadata, gguf_arch, gguf_tensors, write_tensors
    from sqlgpt.model.model import GPT
    model = GPT(arch)
    model.init_weights(rng)
    weights = {t.name: t.data for t in model.base}
    kind = gguf_arch(arch)
    writer = gguf.GGUFWriter(str(path), kind)
    _metadata(writer, gguf, arch, kind, "f32" if fmt == "q4_0" else fmt)
    tokens, merges = synthetic_vocab(arch.n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(merges)
    writer.add_eos_token_id(0)
    write_tensors(writer, gguf, gguf_tensors(arch, weights), fmt)


def llama_bench(binaries, gguf_path):
    """(pp512, tg128) tokens/s of llama.cpp's llama-bench on 2 threads."""
    out = subprocess.run([str(Path(binaries) / "llama-bench"), "-m", str(gguf_path), "-p",
                          str(PROMPT), "-n", str(NEW), "-t", "2", "-r", str(ROUNDS), "-o",
                          "json"], capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"llama-bench failed: {out.stderr[-500:]}")
    runs = json.loads(out.stdout)
    pp = next(r["avg_ts"] for r in runs if r["n_prompt"] == PROMPT and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in runs if r["n_gen"] == NEW and r["n_prompt"] == 0)
    return pp, tg, runs[0].get("build_commit", "?")


SQLGPT_SIDE = """
import json, statistics, sys, time
import numpy as np
import sqlgpt
from sqlgpt.inference.generate import generate_ids
sqlgpt.set_threads(2)
db, precision, rounds, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), \\
    int(sys.argv[4]), int(sys.argv[5])
def peak_mb():
    # VmHWM: this process's own peak (getrusage's ru_maxrss keeps the peak of
    # the process it was forked from, the benchmark that made the model)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
start = time.perf_counter()
model = sqlgpt.load(db, precision)
decoder = model.decoder()
load_s = time.perf_counter() - start
ids = np.random.default_rng(0).integers(0, model.arch.n_vocab, prompt).tolist()
pp, tg = [], []
for _ in range(rounds):
    t = time.perf_counter()
    logits = decoder.run([0] * prompt, ids, list(range(prompt)), [prompt - 1])
    pp.append(prompt / (time.perf_counter() - t))
    t = time.perf_counter()  # from one token, as llama-bench's tg runs (greedy, no end)
    made = len(list(generate_ids(decoder, [int(np.argmax(logits[0]))], new, 0)))
    tg.append(made / (time.perf_counter() - t))
print(json.dumps({"pp": statistics.median(pp), "tg": statistics.median(tg), "load_s": load_s,
                  "rss_mb": peak_mb()}))
"""


def sqlgpt_side(gguf_path, fmt, folder):
    db = Path(folder) / f"{gguf_path.stem}.db"
    start = time.perf_counter()
    # in the scratch folder: a checkout's root holds the sqlgpt source, not the installed one
    done = subprocess.run([sys.executable, "-m", "sqlgpt.cli", "import", str(gguf_path),
                           "--db", str(db)], capture_output=True, text=True, cwd=folder)
    if done.returncode:
        raise SystemExit(f"sqlgpt import failed: {done.stderr[-500:]}")
    import_s = time.perf_counter() - start
    out = subprocess.run([sys.executable, "-c", SQLGPT_SIDE, str(db), PRECISION[fmt],
                          str(ROUNDS), str(PROMPT), str(NEW)], capture_output=True, text=True,
                         cwd=folder)
    if out.returncode:
        raise SystemExit(f"sqlgpt failed: {out.stderr[-500:]}")
    result = json.loads(out.stdout)
    result.update(import_s=import_s, db_mb=db.stat().st_size / 2**20)
    db.unlink()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", required=True, help="the folder holding llama-bench")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import numpy as np
    from sqlgpt.model.arch import preset
    rows, results, commit = [], [], "?"
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes.split(","):
            fields = dict(SHAPES[shape])
            arch = preset(fields.pop("preset"), **fields).validate()
            for fmt in args.formats.split(","):
                path = Path(folder) / f"{shape}-{fmt}.gguf"
                write_gguf(path, arch, fmt, np.random.default_rng(0))
                pp, tg, commit = llama_bench(args.llama_cpp, path)
                ours = sqlgpt_side(path, fmt, folder)
                path.unlink()
                results.append({"shape": shape, "format": fmt, "llama_pp": pp, "llama_tg": tg,
                                **ours})
                rows.append([shape, fmt, f"{pp:,.0f}", f"{ours['pp']:,.0f}",
                             f"{ours['pp'] / pp:.2f}x", f"{tg:,.1f}", f"{ours['tg']:,.1f}",
                             f"{ours['tg'] / tg:.2f}x", f"{ours['import_s']:.0f}",
                             f"{ours['load_s']:.1f}", f"{ours['rss_mb']:,.0f}",
                             f"{ours['db_mb']:,.0f}"])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"llama.cpp build {commit}, 2 threads; tokens/s, the median of {ROUNDS} runs")
    print(render(["shape", "GGUF", "llama.cpp pp512", "sqlgpt pp512", "pp ratio",
                  "llama.cpp tg128", "sqlgpt tg128", "tg ratio", "import s", "load s",
                  "sqlgpt RSS MB", "database MB"], rows, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
