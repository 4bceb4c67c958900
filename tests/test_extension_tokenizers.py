"""The extension's imported (hf) tokenizers: models imported with sqlgpt
import, each tokenizer trained here by the tokenizers library in one of the
shapes sqlgpt imports (GPT-2's byte-level BPE, llama 3's and Qwen2's
patterns, Qwen2's NFC, SentencePiece-style byte fallback by a normalizer or
by Metaspace), give in SQL the ids the library gives, on chosen and on
generated text; generation and chat equal Python's; a damaged or foreign
tokenizer.json is a one-line SQL error, never a crash."""
import json
import shutil
import sqlite3
import subprocess

import pytest
import torch
import transformers
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, trainers)

import sqlgpt
from sqlgpt.chat.template import CHATML_TEMPLATE
from sqlgpt.cli import main
from sqlgpt.contract import PRETOKENIZER_PATTERNS

from conftest import CORPUS
from test_extension import EXT, SHELL, client, quote, through_python
from test_gguf_import import corpus, stored_imports  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(EXT is None, reason="the extension is not built")

MULTILINGUAL = ("Ünïcödé café naïve résumé Ελληνικά σοφός ΟΔΟΣ русский текст İstanbul straße "
                "中文文本 日本語のテキスト 한국어 텍스트 العربية हिन्दी 😀🎉👍 "
                "it's we'll they're I'VE 12345 3.14159 1,000,000\n\t\r\n  ")
TEXTS = ["", "a", "Hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\r\nend",
         "it's I'LL they'Re we've 'd 'M 'sT", "numbers 1 12 123 1234 12345 ١٢٣ ⅷ ½",
         "caf\u00e9 cafe\u0301 \u1e9b\u0323 \uac00\u11a8 \u1100\u1161\u11a8 A\u030a\u0301 \u0958",
         "中文 日本語 한국어 😀👍🏽 \U0001f468\u200d\U0001f469", "\u00a0nbsp\u3000wide\u2028line",
         "x  \n\n  y", "   ", "\n", "a<|im_start|>b <tool>c<|endoftext|>",
         "<tool> x [INST]y  [INST] <tool>", " <tool>", "'ſ 'S ſ",
         "trailing spaces   ", "...!!! ???", "\x00\x1c\x1f\x85 ctrl", MULTILINGUAL]
SPACE = "\u2581"


def train_text():
    return CORPUS.read_text()[:60000] + MULTILINGUAL * 20


def split(pattern):
    return pre_tokenizers.Split(Regex(PRETOKENIZER_PATTERNS[pattern]), "isolated")


def byte_level(pre, normalizer=None, ignore_merges=False, vocab=600):
    """A byte-level BPE trained here on pre (a pre-tokenizer ending in
    ByteLevel), with special and non-special added tokens."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([train_text()], trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.add_tokens([AddedToken("<tool>", normalized=False), AddedToken("cafe\u0301", special=False)])
    return tok


def sentencepiece(metaspace):
    """llama 2's shape: BPE with byte fallback over "\u2581" for spaces, by a
    Prepend and Replace normalizer or by Metaspace; <unk> <s> </s> first."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first",
                                                     split=False)
        tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE),
                                               normalizers.Replace(" ", SPACE)])
        tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    # the trainer sees the text as the model will: spaces as U+2581, one in front
    text = [SPACE + line.replace(" ", SPACE) for line in train_text().splitlines()]
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] +
                                  [f"<0x{b:02X}>" for b in range(256)])
    pre = tok.pre_tokenizer
    tok.pre_tokenizer = None
    normalizer = tok.normalizer
    tok.normalizer = None
    tok.train_from_iterator(text, trainer)
    tok.pre_tokenizer, tok.normalizer = pre, normalizer
    spec = json.loads(tok.to_str())
    # the byte tokens are ordinary vocabulary (SentencePiece's), not added ones
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens([AddedToken("<tool>", normalized=False), AddedToken("[INST]", normalized=False)])
    return tok


SHAPES = {
    "gpt-2": lambda: byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "gpt-2-prefix": lambda: byte_level(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "smollm": lambda: byte_level(pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])),
    "llama-3": lambda: byte_level(pre_tokenizers.Sequence([
        split("llama-3"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        ignore_merges=True),
    "qwen2": lambda: byte_level(pre_tokenizers.Sequence([
        split("qwen2"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        normalizer=normalizers.NFC()),
    "digits-gpt-2": lambda: byte_level(pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False), split("gpt-2"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
    "spm-normalizer": lambda: sentencepiece(metaspace=False),
    "spm-metaspace": lambda: sentencepiece(metaspace=True),
}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def imported(tok, folder, chat_template=None):
    """A tiny random transformers model saved with tok, imported by sqlgpt."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>") or tok.token_to_id("</s>") or 0
    bos = tok.token_to_id("<|endoftext|>") or tok.token_to_id("<s>") or 0
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=bos, eos_token_id=eos))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder / "hf")
    tok.save(str(folder / "hf" / "tokenizer.json"))
    if chat_template:
        (folder / "hf" / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": chat_template}))
    run("import", folder / "hf", "--db", folder / "model.db")
    return folder / "model.db"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """{shape: (the library's tokenizer, the imported model's database)}."""
    out = {}
    for name, make in SHAPES.items():
        tok = make()
        out[name] = (tok, imported(tok, tmp_path_factory.mktemp(name),
                                   CHATML_TEMPLATE if name == "qwen2" else None))
    return out


def library_ids(tok, text):
    tok.encode_special_tokens = True
    return tok.encode(text, add_special_tokens=False).ids


def as_sql(text):
    """text as a SQL TEXT value (a NUL too)."""
    return f"CAST(x'{text.encode().hex()}' AS TEXT)"


def extension_ids(db, texts):
    queries = [f"SELECT sqlgpt_tokens({as_sql(t)})" for t in texts]
    got, = client([{"db": str(db), "queries": queries}])
    return [json.loads(g) if isinstance(g, str) else g for g in got]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_library_s_ids_on_chosen_text(shapes, shape):
    tok, db = shapes[shape]
    texts = TEXTS + [CORPUS.read_text()[:30000]]
    model = sqlgpt.load(db)
    for text, got in zip(texts, extension_ids(db, texts)):
        assert got == library_ids(tok, text), text[:80]
        assert got == model.encode(text).tolist()


# text from every corner of Unicode, with the characters the patterns treat
# apart and the added tokens; only characters this Python's Unicode knows (the
# library's regex engine knows newer ones: U+2EE30 is a CJK letter since 15.1)
TEXT = st.lists(st.one_of(
    st.characters(blacklist_categories=("Cs", "Cn")),
    st.sampled_from(list(" \t\n\r'sStTlLdDmMreREvV0123456789\u0301\u00e9\u017f\u00a0\u3000"
                         "\u2581<>|_")),
    st.sampled_from(["<tool>", "[INST]", "<|im_end|>", "cafe\u0301", "  "])),
    max_size=30).map("".join)


def generated(examples=150):
    """examples x 40 texts of TEXT."""
    found = []

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(TEXT, min_size=40, max_size=40))
    def collect(texts):
        found.append(texts)
    collect()
    return [t for batch in found for t in batch]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_library_s_ids_on_generated_text(shapes, shape):
    tok, db = shapes[shape]
    texts = generated()
    for text, got in zip(texts, extension_ids(db, texts)):
        assert got == library_ids(tok, text), repr(text)


def byte_level_after(*steps, prefix=False, regex=False):
    last = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=regex)
    return pre_tokenizers.Sequence([*steps, last]) if steps else last


PRE_TOKENIZERS = {
    "gpt-2": lambda: byte_level_after(regex=True),
    "gpt-2, prefix space": lambda: byte_level_after(prefix=True, regex=True),
    "llama-3": lambda: byte_level_after(split("llama-3")),
    "qwen2": lambda: byte_level_after(split("qwen2")),
    "digits, gpt-2": lambda: byte_level_after(pre_tokenizers.Digits(individual_digits=True),
                                              regex=True),
    "digit runs, llama-3, prefix": lambda: byte_level_after(
        pre_tokenizers.Digits(individual_digits=False), split("llama-3"), prefix=True),
}


@pytest.mark.parametrize("name", list(PRE_TOKENIZERS))
def test_the_pre_tokenizer_s_pieces_are_the_library_s(tmp_path, name):
    """Each piece the library cuts the texts into is a token of its own here
    (with ignore_merges, a piece that is a token is that token), so the ids
    are the pieces: where the extension cut otherwise, the ids differ."""
    texts = generated(50) + TEXTS
    pre = PRE_TOKENIZERS[name]()
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    db = imported(tok, tmp_path)
    for text, got in zip(texts, extension_ids(db, texts)):
        assert got == library_ids(tok, text), repr(text)


def test_nfc_of_every_character_that_normalization_touches(shapes):
    """The qwen2 tokenizer normalizes by NFC, which in C is Python's
    unicodedata.normalize("NFC"): text of the characters NFC can change or
    combine (and Hangul jamo, and a run of 3,000 marks), mixed with
    letters, gets the ids the library gives that normal form. (The
    library's own NFC tables are older: it leaves alone the marks Unicode
    added since, as NKO DANTAYALAN, U+07FD; on text without those the two
    agree, and there the ids are the library's on the text itself.)"""
    import random
    import unicodedata
    tok, db = shapes["qwen2"]
    touched = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000 and (
        unicodedata.combining(chr(c)) or unicodedata.decomposition(chr(c)) and
        not unicodedata.decomposition(chr(c)).startswith("<"))]
    touched += [chr(c) for c in (*range(0x1100, 0x1113), *range(0x1161, 0x1176),
                                 *range(0x11A8, 0x11C3))]
    rng = random.Random(0)
    texts = ["".join(rng.choice(touched + list("aeoAEO ")) for _ in range(12))
             for _ in range(600)]
    texts += ["".join(touched[i:i + 200]) for i in range(0, len(touched), 200)]
    texts += ["e" + "\u0301\u0323\u0300" * 1000, "caf\u00e9 cafe\u0301 \u1e9b\u0323"]
    library_nfc = normalizers.NFC().normalize_str
    for text, got in zip(texts, extension_ids(db, texts)):
        normal = unicodedata.normalize("NFC", text)
        assert got == library_ids(tok, normal), repr(text)
        if library_nfc(text) == normal:
            assert got == library_ids(tok, text), repr(text)


@pytest.mark.parametrize("kind", ["qwen2", "sentencepiece"])
def test_tokenizers_imported_from_gguf_give_python_s_ids(tmp_path, corpus, kind):
    """A GGUF file's tokenizer, as sqlgpt import builds its tokenizer.json
    (llama.cpp's byte-level "gpt2" with a pre-tokenizer pattern; its
    SentencePiece "llama" with merges from the scores)."""
    pytest.importorskip("gguf")
    from test_gguf_import import LLAMA3, hf_family, library_tokenizer, spm_gguf
    from test_gguf_import import write_like_llama_cpp
    path, db = tmp_path / "m.gguf", tmp_path / "m.db"
    if kind == "sentencepiece":
        spm_gguf(path, corpus)
    else:
        tok = library_tokenizer(corpus, LLAMA3)
        write_like_llama_cpp(path, kind, hf_family(kind, tok.get_vocab_size(), True), tok)
    run("import", path, "--db", db)
    model = sqlgpt.load(db)
    texts = TEXTS + [CORPUS.read_text()[:5000]]
    for text, got in zip(texts, extension_ids(db, texts)):
        assert got == model.encode(text).tolist(), text[:80]


def test_invalid_utf8_is_refused(shapes):
    _, db = shapes["gpt-2"]
    got, = client([{"db": str(db), "queries": ["SELECT sqlgpt_tokens(CAST(x'ff61' AS TEXT))",
                                               "SELECT sqlgpt_tokens(x'6161')"]}])
    assert "not valid UTF-8" in got[0]["error"] and "TEXT" in got[1]["error"]


@pytest.mark.parametrize("shape", ["gpt-2", "qwen2", "spm-normalizer"])
def test_generate_logprob_and_embed_equal_python_s(shapes, shape):
    _, db = shapes[shape]
    queries = [f"SELECT sqlgpt_generate({quote(p)}, 12, {t}, 3)"
               for p in ("Hello", "café ", "") for t in (0, 0.8)]
    queries += ["SELECT sqlgpt_logprob('the king is dead')"]
    ours, = client([{"db": str(db), "queries": queries}])
    theirs = through_python(db, queries)
    assert ours[:-1] == theirs[:-1]
    assert abs(ours[-1] - theirs[-1]) <= 1e-5 * max(1.0, abs(theirs[-1]))


@pytest.mark.skipif(SHELL is None, reason="no sqlite3 shell")
def test_greedy_text_in_the_shell_is_the_python_api_s(shapes):
    _, db = shapes["llama-3"]
    sql = f".load {EXT}\nSELECT sqlgpt_generate('First Citizen', 16, 0);\n"
    shell = subprocess.run([SHELL, str(db)], input=sql, capture_output=True, text=True,
                           timeout=120)
    assert shell.returncode == 0, shell.stderr
    model = sqlgpt.load(db)
    text = model.generate("First Citizen", max_tokens=16, temperature=0)
    assert "First Citizen" + shell.stdout.rstrip("\n") == text


@pytest.mark.parametrize("shape", ["qwen2", "gpt-2"])
def test_chat_with_the_added_tokens_as_their_ids(shapes, shape):
    """qwen2's import has ChatML's template, gpt-2's sqlgpt's (its bos and
    eos, <|endoftext|> and <|im_end|>, as their ids)."""
    tok, db = shapes[shape]
    chats = [[{"role": "user", "content": "hi there"}],
             [{"role": "system", "content": "be <|im_end|> brief"},
              {"role": "user", "content": "café?"}]]
    queries = [f"SELECT sqlgpt_chat({quote(json.dumps(c))}, 10, {t}, 5)"
               for c in chats for t in (0, 1.0)]
    ours, = client([{"db": str(db), "queries": queries}])
    assert ours == through_python(db, queries)
    assert all(isinstance(text, str) for text in ours)
    model = sqlgpt.load(db)
    from sqlgpt.chat.conversation import ChatFormat
    chat = ChatFormat(model.tokenizer, CHATML_TEMPLATE if shape == "qwen2" else None)
    first = "<|im_start|>" if shape == "qwen2" else "<|endoftext|>"
    assert chat.prompt(chats[0]).tolist()[0] == tok.token_to_id(first)
    assert chat.end_id == tok.token_to_id("<|im_end|>")


# ---- damaged and foreign tokenizer.json: SQL errors, never a crash ----
def damaged(db, folder, change):
    """A copy of db whose tokenizer_json change(spec) rewrote (a str: as is)."""
    copy = folder / f"damaged-{len(list(folder.iterdir()))}.db"
    shutil.copy(db, copy)
    conn = sqlite3.connect(copy)
    text, = conn.execute("SELECT value FROM tokenizer WHERE key = 'tokenizer_json'").fetchone()
    spec = json.loads(text)
    changed = change(spec)
    conn.execute("UPDATE tokenizer SET value = ? WHERE key = 'tokenizer_json'",
                 (changed if isinstance(changed, str) else json.dumps(changed),))
    conn.commit()
    conn.close()
    return copy


def edit(path, value):
    def change(spec):
        part = spec
        for key in path[:-1]:
            part = part[key]
        part[path[-1]] = value
        return spec
    return change


def merges_of(spec):
    return spec["model"]["merges"]


CHANGES = {
    "not json": lambda spec: "{not json",
    "a list": lambda spec: "[1, 2, 3]",
    "no model": lambda spec: {k: v for k, v in spec.items() if k != "model"},
    "unigram": edit(("model", "type"), "Unigram"),
    "merge of unknown tokens": lambda spec: edit(("model", "merges"),
                                                 merges_of(spec) + [["zzzq", "qqqz"]])(spec),
    "merge making no token": lambda spec: edit(("model", "merges"),
                                               [["a", "\u0120\u0120\u0120"]] + merges_of(spec))(spec),
    "merge of three": lambda spec: edit(("model", "merges"), [["a", "b", "c"]])(spec),
    "merge not text": lambda spec: edit(("model", "merges"), [[1, 2]])(spec),
    "merges an object": edit(("model", "merges"), {"a": "b"}),
    "huge id": lambda spec: edit(("model", "vocab"), {**spec["model"]["vocab"], "zz": 2**40})(spec),
    "negative id": lambda spec: edit(("model", "vocab"), {**spec["model"]["vocab"], "zz": -1})(spec),
    "id twice": lambda spec: edit(("model", "vocab"), {**spec["model"]["vocab"], "zz": 5})(spec),
    "vocab a list": edit(("model", "vocab"), [1, 2]),
    "unknown pattern": edit(("pre_tokenizer", "pretokenizers", 0, "pattern"),
                            {"Regex": ".(?=.*Q)|."}),
    "string pattern": edit(("pre_tokenizer", "pretokenizers", 0, "pattern"), {"String": " "}),
    "merged behavior": edit(("pre_tokenizer", "pretokenizers", 0, "behavior"), "MergedWithNext"),
    "whitespace step": edit(("pre_tokenizer", "pretokenizers", 0), {"type": "Whitespace"}),
    "no byte level": edit(("pre_tokenizer",), None),
    "lowercase": edit(("normalizer",), {"type": "Lowercase"}),
    "dropout": edit(("model", "dropout"), 0.5),
    "suffix": edit(("model", "end_of_word_suffix"), "</w>"),
    "added id out of range": edit(("added_tokens",), [{"id": 10**9, "content": "x"}]),
    "added without content": edit(("added_tokens",), [{"id": 3}]),
    "added lstrip": lambda spec: edit(("added_tokens",), [
        {**a, "lstrip": True, "special": False} for a in spec["added_tokens"]])(spec),
    "deep": lambda spec: edit(("normalizer",), json.loads("[" * 500 + "]" * 500))(spec),
}


def test_damaged_tokenizer_json_is_a_sql_error(shapes, tmp_path):
    _, db = shapes["llama-3"]
    runs = [{"db": str(damaged(db, tmp_path, change)), "queries": ["SELECT sqlgpt_tokens('hi')"]}
            for change in CHANGES.values()]
    for name, (got,) in zip(CHANGES, client(runs)):
        assert isinstance(got, dict) and "error" in got, (name, got)
        assert "\n" not in got["error"], name


def test_damaged_specials_and_rows_are_sql_errors(shapes, tmp_path):
    _, db = shapes["spm-metaspace"]
    changes = ["UPDATE tokenizer SET value = '{\"eos\": 99999999}' WHERE key = 'specials'",
               "UPDATE tokenizer SET value = 'nope' WHERE key = 'specials'",
               "UPDATE tokenizer SET value = '{\"eos\": true}' WHERE key = 'specials'",
               "UPDATE vocab SET bytes = x'41' WHERE id = 300",
               "UPDATE vocab SET bytes = NULL WHERE id = 300",
               "DELETE FROM tokenizer WHERE key = 'tokenizer_json'"]
    runs = []
    for i, sql in enumerate(changes):
        copy = tmp_path / f"rows-{i}.db"
        shutil.copy(db, copy)
        conn = sqlite3.connect(copy)
        conn.execute(sql)
        conn.commit()
        conn.close()
        runs.append({"db": str(copy), "queries": ["SELECT sqlgpt_tokens('hi')"]})
    for sql, (got,) in zip(changes, client(runs)):
        assert isinstance(got, dict) and "error" in got, (sql, got)


def mutated(text, data):
    """text with a random part cut, swapped or replaced by random JSON."""
    how = data.draw(st.sampled_from(["cut", "bytes", "value"]))
    at = data.draw(st.integers(0, len(text) - 1))
    if how == "cut":
        return text[:at]
    if how == "bytes":
        return text[:at] + data.draw(st.text(max_size=8)) + text[at + 1:]
    # a value of the JSON replaced: after a ':' or a '[' or ','
    starts = [i for i, c in enumerate(text) if c in ":[,"]
    start = starts[data.draw(st.integers(0, len(starts) - 1))] + 1
    end = start + data.draw(st.integers(0, 40))
    value = data.draw(st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) |
                                   st.text(max_size=6),
                                   lambda inner: st.lists(inner, max_size=3) |
                                   st.dictionaries(st.sampled_from(
                                       ["type", "id", "content", "pattern", "Regex"]), inner,
                                       max_size=3), max_leaves=6))
    return text[:start] + json.dumps(value) + text[end:]


def test_fuzzed_tokenizer_json_loads_or_is_a_sql_error(shapes, tmp_path):
    _, db = shapes["qwen2"]
    text, = sqlite3.connect(db).execute(
        "SELECT value FROM tokenizer WHERE key = 'tokenizer_json'").fetchone()
    found = []

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data):
        found.append(mutated(text, data))
    collect()
    runs = [{"db": str(damaged(db, tmp_path, lambda spec, t=t: t)),
             "queries": ["SELECT sqlgpt_tokens('it''s 12 cafés 中文')"]} for t in found]
    for (got,), t in zip(client(runs), found):  # the client came back: nothing crashed
        assert isinstance(got, str) or "error" in got


@pytest.mark.parametrize("qtype, precision", [("Q8_0", "int8"), ("Q4_0", "int4"),
                                              (None, "f16"), ("F16", "f16"), ("BF16", "bf16"),
                                              ("Q8_0", "fp32"), ("F16", "fp32")])
def test_gguf_imports_generate_in_their_precision_as_python_does(tmp_path, corpus, qtype,
                                                                 precision):
    """A Q8_0/Q4_0 file's blocks (the int8/int4 copy, its matrices' only
    storage), an F16/BF16 file's half rows and float weights run in their
    precision or in float32: the extension's greedy and sampled text is
    Python's."""
    gguf = pytest.importorskip("gguf")
    from test_gguf_import import LLAMA3, hf_family, library_tokenizer, write_like_llama_cpp
    qtype = getattr(gguf.GGMLQuantizationType, qtype) if qtype else None
    path, db = tmp_path / "m.gguf", tmp_path / "m.db"
    tok = library_tokenizer(corpus, LLAMA3)
    write_like_llama_cpp(path, "qwen2", hf_family("qwen2", tok.get_vocab_size(), True), tok,
                         qtype)
    assert run("import", path, "--db", db).exit_code == 0
    queries = [f"SELECT sqlgpt_generate({quote(p)}, 12, {t}, 3)"
               for p in ("Hello", "café ") for t in (0, 0.8)]
    ours, = client([{"db": str(db), "setup": [f"SELECT sqlgpt_model('main', '{precision}')"],
                     "queries": queries}])
    assert ours == through_python(db, queries, precision)


@pytest.mark.parametrize("qtype, sql, message", [
    ("Q8_0", "DELETE FROM quantized WHERE tensor = 'layers.0.q' AND i = 3", "int8"),
    ("Q8_0", "UPDATE quantized SET crc = crc + 1 WHERE tensor = 'head' AND i = 5", "int8"),
    ("Q8_0", "DELETE FROM tensor_formats", "rows"),
    # (int8 decoding reads that matrix from the copy alone: it has no rows to miss)
    ("Q8_0", "UPDATE tensor_formats SET format = 'f16' WHERE name = 'layers.0.fc2'", "rows"),
    ("Q8_0", "INSERT OR REPLACE INTO tensor_formats VALUES ('lnf_w', 'int8')",
     "tensor_formats table is damaged"),
    ("Q8_0", "INSERT OR REPLACE INTO tensor_formats VALUES ('layers.9.q', 'f16')",
     "tensor_formats table is damaged"),
    ("Q8_0", "DROP TABLE tensor_formats; CREATE TABLE tensor_formats (name, format); "
             "INSERT INTO tensor_formats VALUES ('layers.0.q', 'int2')",
     "tensor_formats table is damaged"),
    ("F16", "UPDATE layers SET data = substr(data, 1, 10) WHERE component = 'k' AND i = 1",
     "damaged"),
    ("F16", "DELETE FROM tensor_formats WHERE name = 'layers.1.fc1'", "damaged"),
    ("F16", "UPDATE layers SET crc = crc + 1 WHERE component = 'v' AND i = 2", "checksum"),
    ("F16", "UPDATE tensor_formats SET format = 'int8' WHERE name = 'layers.0.q'", "int8"),
])
def test_an_import_kept_in_its_precision_and_damaged_is_an_error(stored_imports, tmp_path,
                                                                qtype, sql, message):
    """Damage to how an import is kept (its formats, its half rows, its
    integer rows) is a one-line error in Python and an SQL error in the
    extension, in every precision."""
    db = tmp_path / "damaged.db"
    shutil.copy(stored_imports[qtype], db)
    conn = sqlite3.connect(db)
    conn.executescript(sql)
    conn.commit()
    conn.close()
    half = qtype == "F16" or "'f16' WHERE" in sql
    for precision in ("fp32", "f16") if half else ("fp32", "int8"):
        result = CliRunner().invoke(main, ["generate", "--db", str(db), "--prompt", "Hello",
                                           "--max-tokens", "3", "--precision", precision])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert message in result.output and "Traceback" not in result.output, result.output
        got, = client([{"db": str(db), "setup": [f"SELECT sqlgpt_model('main', '{precision}')"],
                        "queries": ["SELECT sqlgpt_generate('Hello', 3, 0)"]}])
        assert isinstance(got[0], dict) and message in got[0]["error"], (precision, got)
