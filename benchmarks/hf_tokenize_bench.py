"""Encoding speed of imported (hf) tokenizers: the loadable extension's C
encoder against the tokenizers library, on the same tokenizer and text.

    python benchmarks/hf_tokenize_bench.py [--vocab 8000] [--repeats 3] [--markdown]

The tokenizers: byte-level BPEs splitting by each real model's pattern of
contract.PRETOKENIZER_PATTERNS (gpt-2; llama-3; qwen2, with NFC) and a
SentencePiece-style BPE with byte fallback (llama 2's shape), each trained
by the library on examples/tinyshakespeare.txt and the multilingual sample,
saved with a tiny random llama and imported by `sqlgpt import`. The texts:
tinyshakespeare (1.1 MB) and a multilingual sample (1 MB of sentences in
twelve scripts with numbers and emoji, drawn at random).

Each side encodes the whole text in one call, best of --repeats, and both
give the same ids: the extension as SELECT sqlgpt_tokens(...) (the ids
written out as JSON text included) in the sqlite3 shell (.timer, over
statements of five calls); the library's Tokenizer.encode (one text runs on one thread)
with RAYON_NUM_THREADS=1, and its encode_batch over the text's lines with
RAYON_NUM_THREADS=1 and with its default threads (what the library does
fastest).
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tables import render  # benchmarks/ is sys.path[0] as a script

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "tinyshakespeare.txt"
SPACE = "\u2581"
SENTENCES = [
    "Le café est prêt, mais la crème brûlée n'est pas encore servie.",
    "Der Straßenbahnfahrer öffnete die Türen um 7:45 Uhr.",
    "Быстрая коричневая лиса перепрыгивает через ленивую собаку.",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "我们在北京的会议将于2024年3月15日举行，请准时参加。",
    "東京の天気は晴れですが、明日は雨が降るでしょう。",
    "서울의 인구는 약 970만 명입니다.",
    "الطقس جميل اليوم في القاهرة، ودرجة الحرارة 25 درجة.",
    "आज मौसम बहुत अच्छा है और हम पार्क जाएंगे।",
    "Bugün İstanbul'da hava çok güzel; ağaçlar çiçek açtı.",
    "ভারতের রাজধানী নয়াদিল্লি এবং জনসংখ্যা ১৪০ কোটি।",
    "It's 3.14159 o'clock — we'll see 😀🎉 at the café\u0301 (1,000,000 visitors!)",
]


def multilingual(mb, seed=0):
    rng = random.Random(seed)
    lines, size = [], 0
    while size < mb * 2**20:
        line = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 4)))
        lines.append(line + " " + str(rng.randint(0, 99999)))
        size += len(line.encode()) + 7
    return "\n".join(lines) + "\n"


def trained(shape, vocab, text):
    """The library's tokenizer of shape, trained on text."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import trainers
    from sqlgpt.contract import PRETOKENIZER_PATTERNS
    spm = shape == "sentencepiece"
    tok = Tokenizer(models.BPE(byte_fallback=spm, ignore_merges=shape == "llama-3"))
    if spm:
        tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        text = [SPACE + line.replace(" ", SPACE) for line in text.splitlines()]
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        tok.train_from_iterator(text, trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=specials, show_progress=False))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE),
                                               normalizers.Replace(" ", SPACE)])
        spec = json.loads(tok.to_str())  # the byte tokens are vocabulary, not added tokens
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials[:3]]
        return Tokenizer.from_str(json.dumps(spec))
    split = pre_tokenizers.Split(Regex(PRETOKENIZER_PATTERNS[shape]), "isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.normalizer = normalizers.NFC() if shape == "qwen2" else None
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tok


def imported(tok, folder):
    """tok with a tiny random llama, imported by sqlgpt: the database."""
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64))
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    db = folder / "model.db"
    subprocess.run([sys.executable, "-c", "from sqlgpt.cli import main; main()", "import",
                    str(folder), "--db", str(db)],
                   check=True, capture_output=True)
    return db


# the library's side, in a fresh process so RAYON_NUM_THREADS holds: db text repeats
LIBRARY_SIDE = """
import json, sqlite3, sys, time
from tokenizers import Tokenizer
db, path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = open(path, encoding="utf-8").read()
spec, = sqlite3.connect(db).execute(
    "SELECT value FROM tokenizer WHERE key = 'tokenizer_json'").fetchone()
tok = Tokenizer.from_str(spec)
tok.encode_special_tokens = True
lines = text.splitlines(keepends=True)

def best(run):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return min(times), out

whole, ids = best(lambda: tok.encode(text, add_special_tokens=False).ids)
batch, _ = best(lambda: tok.encode_batch(lines, add_special_tokens=False))
print(json.dumps([whole, batch, ids]))
"""


def extension_side(db, path, repeats, calls=5):
    """(best seconds a call, ids) of SELECT sqlgpt_tokens on the text at
    path, in the sqlite3 shell: the model loaded and the ids read first,
    untimed; then statements of `calls` calls each, timed (.timer has
    milliseconds)."""
    import sqlgpt
    shell = shutil.which("sqlite3") or sys.exit("no sqlite3 shell here")
    text = f"CAST(readfile('{path}') AS TEXT)"
    timed = (f"WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {calls}) "
             f"SELECT sum(length(sqlgpt_tokens({text}))) FROM k;\n")
    script = (f".load {sqlgpt.extension_path()}\nSELECT sqlgpt_tokens({text});\n.timer on\n"
              + timed * repeats)
    done = subprocess.run([shell, str(db)], input=script, capture_output=True, text=True,
                          check=True)
    lines = done.stdout.splitlines()
    times = [float(line.split()[3]) for line in lines if line.startswith("Run Time:")]
    return min(times) / calls, json.loads(lines[0])


def side(command, threads=None):
    env = dict(os.environ)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    else:
        env.pop("RAYON_NUM_THREADS", None)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8000, help="each tokenizer's vocabulary")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = {"tinyshakespeare": CORPUS.read_text(encoding="utf-8"),
                 "multilingual": multilingual(1)}
        paths = {}
        for name, text in texts.items():
            paths[name] = tmp / f"{name}.txt"
            paths[name].write_text(text, encoding="utf-8")
        for shape in ("gpt-2", "llama-3", "qwen2", "sentencepiece"):
            folder = tmp / shape
            folder.mkdir()
            db = imported(trained(shape, args.vocab, "".join(texts.values())), folder)
            for name, path in paths.items():
                mb = path.stat().st_size / 2**20
                ours, our_ids = extension_side(db, path, args.repeats)
                whole, batch1, ids = side([sys.executable, "-c", LIBRARY_SIDE, str(db),
                                           str(path), str(args.repeats)], threads=1)
                _, batch, _ = side([sys.executable, "-c", LIBRARY_SIDE, str(db), str(path),
                                    "1"])
                if our_ids != ids:
                    raise SystemExit(f"{shape} on {name}: the extension's ids differ from the "
                                     f"library's")
                rows.append([shape, name, f"{mb / ours:.2f}", f"{mb / whole:.2f}",
                             f"{mb / batch1:.2f}", f"{mb / batch:.2f}",
                             f"{whole / ours:.1f}x"])
    header = ["tokenizer", "text", "extension MB/s", "library MB/s (1 thread)",
              "library batch MB/s (1 thread)", "library batch MB/s (default threads)",
              "extension / library"]
    print(render(header, rows, args.markdown))
    print(f"\n{os.cpu_count()} CPUs; whole texts in one call, best of {args.repeats}; "
          f"{time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
