"""Run a sqlgpt model's GGUF export in llama.cpp itself, beside sqlgpt.

    python benchmarks/llamacpp_check.py --llama-cpp LLAMA_CPP/build/bin --db model.db
                                        [--prompt "the king"] [--tokens 40]

For each GGUF tensor format (f32, f16, q8_0): export --db, tokenize the
prompt with llama.cpp's llama-tokenize, and generate greedily with its
llama-simple; then compare with sqlgpt's own ids and greedy text from the
float32 model, and report llama.cpp's tokens/s beside sqlgpt's (whole run, prompt
included, as llama-simple times it). llama.cpp is not a
dependency: point --llama-cpp at a build of it (cmake --build build
--target llama-simple llama-tokenize).
"""
import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp", required=True, type=Path,
                   help="the directory holding llama-simple and llama-tokenize")
    p.add_argument("--db", required=True, help="a sqlgpt model (gpt2 or llama preset, bpe)")
    p.add_argument("--prompt", default="the king")
    p.add_argument("--tokens", type=int, default=40, help="new tokens to generate")
    return p.parse_args(argv)


def llama_ids(binaries, gguf, prompt):
    out = subprocess.run([str(binaries / "llama-tokenize"), "-m", str(gguf), "-p", prompt,
                          "--ids", "--log-disable"], capture_output=True, text=True, check=True)
    return [int(i) for i in re.findall(r"-?\d+", out.stdout.strip().splitlines()[-1])]


def llama_generate(binaries, gguf, prompt, n):
    """(the text after the prompt, llama.cpp's tokens/s)."""
    out = subprocess.run([str(binaries / "llama-simple"), "-m", str(gguf), "-n", str(n),
                          prompt], capture_output=True, text=True, check=True)
    speed = re.search(r"speed: ([\d.]+) t/s", out.stderr)
    text = out.stdout
    return text[text.index(prompt) + len(prompt):].rstrip("\n"), \
        float(speed.group(1)) if speed else None


def main(args):
    import sqlgpt
    model = sqlgpt.load(args.db)
    ours_ids = [int(i) for i in model.encode(args.prompt)]
    n = min(args.tokens, model.arch.seq_len - len(ours_ids))
    ours_text = model.generate(args.prompt, max_tokens=n, temperature=0)[len(args.prompt):]
    print(f"{args.db}: {model.arch.preset}, {model.num_parameters():,} parameters; prompt "
          f"{args.prompt!r} ({len(ours_ids)} ids), {n} greedy tokens")
    start = time.perf_counter()
    count = sum(1 for _ in model.generate_ids(args.prompt, max_tokens=n, temperature=0))
    print(f"sqlgpt: {ours_text!r} ({count / (time.perf_counter() - start):,.0f} tok/s, fp32, "
          f"prompt included)")
    print("| GGUF | llama.cpp ids = sqlgpt's | greedy text = sqlgpt's (fp32) | "
          "same characters | llama.cpp tok/s |")
    print("| --- | --- | --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("f32", "f16", "q8_0"):
            gguf = Path(tmp) / f"model-{dtype}.gguf"
            sqlgpt.api.export(args.db, gguf, "gguf", dtype=dtype)
            ids = llama_ids(args.llama_cpp, gguf, args.prompt)
            text, speed = llama_generate(args.llama_cpp, gguf, args.prompt, n)
            same = next((i for i, (a, b) in enumerate(zip(text, ours_text)) if a != b),
                        min(len(text), len(ours_text)))
            print(f"| {dtype} | {'yes' if ids == ours_ids else f'no: {ids}'} | "
                  f"{'yes' if text == ours_text else 'no'} | {same} of {len(ours_text)} | "
                  f"{speed if speed is not None else 'n/a'} |")
            if dtype == "f32" and text != ours_text:
                print(f"llama.cpp f32: {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
