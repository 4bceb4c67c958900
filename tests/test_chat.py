"""Chat: fine-tuning on conversations with the loss on the assistant's
tokens alone (checked against PyTorch's cross_entropy with ignore_index),
talking to a model (API, generate --chat, the REPL through a
pseudo-terminal, SQL), beam search against a brute-force search, and bad
conversations as one-line errors naming their line."""
import itertools
import json
import os
import pty
import select
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sqlgpt
from sqlgpt import store
from sqlgpt.chat.conversation import ChatFormat
from sqlgpt.chat.data import ChatTokens, SCORED, START
from sqlgpt.cli import main
from sqlgpt.inference.beam import beam_search, log_softmax
from sqlgpt.inference.decoder import Decoder
from sqlgpt.model.arch import preset
from sqlgpt.model.model import GPT, IGNORE

from conftest import CORPUS
from torch_reference import random_weights, reference_loss

TINY = ["--embed-dim", "32", "--heads", "4", "--layers", "2", "--seq-len", "128",
        "--batch-size", "8", "--vocab-size", "300"]
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Reverse: one two"},
                  {"role": "assistant", "content": "two one"}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Reverse: red blue"},
                  {"role": "assistant", "content": "blue red"},
                  {"role": "user", "content": "Reverse: up down"},
                  {"role": "assistant", "content": "down up"}]},
    {"prompt": "Reverse: cat dog", "completion": "dog cat"},
]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS.read_text()[:40000])
    db = folder / "base.db"
    assert run("train", corpus, "--db", db, "--preset", "gpt2", *TINY, "--iters", "30"
               ).exit_code == 0
    return db


@pytest.fixture(scope="module")
def tuned(base):
    data = write_jsonl(base.parent / "talk.jsonl", CONVERSATIONS * 20)
    db = base.parent / "tuned.db"
    result = run("train", "--chat", data, "--base", base, "--db", db, "--iters", "20")
    assert result.exit_code == 0, result.output
    return db


def test_a_chat_batch_scores_the_assistants_tokens_alone(tuned):
    model = sqlgpt.load(tuned)
    state = store.read_train_state(store.open_database(tuned))
    assert state["chat"]["conversations"] == 60 and state["chat"]["cut"] == 0
    ids = np.memmap(f"{tuned}.tokens", dtype=state["tokens"]["dtype"], mode="r")
    flags = np.memmap(f"{tuned}.chat", dtype=np.uint8, mode="r")
    chat = ChatTokens(ids, flags, model.tokenizer.eos_id)
    assert len(chat) == 60 and (flags[chat.starts] & START).all()
    x, y = chat.rows([1], 128)
    scored = y[0] != IGNORE
    # the targets scored are the two replies and their <eos>, nothing the user wrote
    assert model.tokenizer.pieces(y[0][scored])[-1] == "<eos>"
    assert model.decode(y[0][scored]) == "blue reddown up"
    fmt = ChatFormat(model.tokenizer)
    want_ids, mask = fmt.encode(CONVERSATIONS[1]["messages"])
    assert x[0][:len(want_ids)].tolist() == want_ids.tolist()
    assert np.array_equal(scored[:len(want_ids) - 1], mask[1:])


def test_the_masked_loss_and_gradients_equal_pytorch_with_ignore_index(tuned, rng):
    """The kernel's loss over a chat batch (IGNORE where the user spoke) and
    every gradient equal an independent float64 PyTorch model's
    cross_entropy with ignore_index; the logits' gradient is exactly zero at
    every skipped position, so what the user wrote there cannot matter."""
    model = sqlgpt.load(tuned)
    state = store.read_train_state(store.open_database(tuned))
    chat = ChatTokens(np.memmap(f"{tuned}.tokens", dtype=state["tokens"]["dtype"], mode="r"),
                      np.memmap(f"{tuned}.chat", dtype=np.uint8, mode="r"),
                      model.tokenizer.eos_id)
    x, y = chat.rows([0, 1, 2], 128)
    arch = preset("llama", n_vocab=model.arch.n_vocab, embed_dim=32, num_heads=4, num_layers=2,
                  seq_len=128)
    weights = random_weights(arch, rng)
    gpt = GPT(arch)
    for t in gpt.params:
        t.data[...] = weights[t.name].numpy()
    gpt.params.zero_grad()
    loss = gpt.forward(x, y)
    gpt.backward()
    dlogits = gpt.acts.logits[:x.size].reshape(*x.shape, -1)
    assert not dlogits[y == IGNORE].any() and dlogits[y != IGNORE].any()
    ref_weights = {t.name: torch.tensor(t.data, dtype=torch.float64, requires_grad=True)
                   for t in gpt.params}
    ref = reference_loss(ref_weights, arch, torch.tensor(x, dtype=torch.long),
                         torch.tensor(y, dtype=torch.long),
                         relu_signs=[L["h"] for L in gpt.acts.layers])
    ref.backward()
    assert abs(loss - ref.item()) / ref.item() < 1e-5
    for t in gpt.params:
        expected = ref_weights[t.name].grad.numpy()
        assert np.linalg.norm(t.grad - expected) <= 1e-4 * np.linalg.norm(expected) + 1e-9


def test_a_chat_fine_tune_resumes_and_talks(tuned, base):
    result = run("train", "--db", tuned, "--resume", "--iters", "30")
    assert result.exit_code == 0, result.output
    assert "step 30" in result.output
    model = sqlgpt.load(tuned)
    messages = [{"role": "user", "content": "Reverse: one two"}]
    reply = model.chat(messages, temperature=0, max_tokens=12)
    assert isinstance(reply, str) and reply and "<eos>" not in reply
    cli = run("generate", "--db", tuned, "--chat", "--prompt", "Reverse: one two",
              "--temperature", "0", "--max-tokens", "12", "--no-stream")
    assert cli.exit_code == 0 and cli.output == reply + "\n"
    # the same reply from SQL, through register()
    conn = sqlite3.connect(":memory:")
    sqlgpt.register(conn, tuned)
    got = conn.execute("SELECT sqlgpt_chat(?, 12, 0)", (json.dumps(messages),)).fetchone()[0]
    assert got == reply
    for bad, text in (("not json", "messages"), ('[{"role": "x", "content": "y"}]', "role 'x'"),
                      ("[]", "non-empty")):
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("SELECT sqlgpt_chat(?)", (bad,)).fetchone()
        assert text in conn.execute("SELECT sqlgpt_error()").fetchone()[0]
    # a LoRA chat fine-tune of the same base
    data = write_jsonl(base.parent / "talk2.jsonl", CONVERSATIONS * 5)
    result = run("finetune", "--chat", data, "--base", base, "--db", base.parent / "lora.db",
                 "--iters", "5")
    assert result.exit_code == 0, result.output
    assert sqlgpt.load(base.parent / "lora.db").chat(messages, max_tokens=4, seed=1)


BAD_ROWS = [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: has no assistant message"),
    ('not json', "line 2: not a JSON object"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "line 2: message 1 has role 'wizard'"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
     "line 2: message 1 (user) has no text content"),
    ('{"text": "hello"}', "line 2: has neither"),
    ('{"prompt": "q", "completion": "  "}', "line 2: an assistant message is empty"),
    ('[1, 2]', "line 2: not a JSON object"),
]


@pytest.mark.parametrize("row,text", BAD_ROWS)
def test_bad_conversations_are_one_line_errors_naming_the_line(base, tmp_path, row, text):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(CONVERSATIONS[0]) + "\n" + row + "\n")
    db = tmp_path / "out.db"
    result = run("train", "--chat", data, "--base", base, "--db", db, "--iters", "2")
    assert result.exit_code == 1 and text in result.output, result.output
    assert result.output.count("\n") == 1 and not db.exists()
    assert not list(tmp_path.glob("*.tokens")) and not list(tmp_path.glob("*.chat"))


def test_conversations_longer_than_the_context_are_cut_at_a_turn_or_left_out(base, tmp_path):
    long_turn = {"role": "user", "content": "word " * 150}
    rows = [CONVERSATIONS[1],
            {"messages": CONVERSATIONS[1]["messages"][:3] + [long_turn,
                                                             {"role": "assistant",
                                                              "content": "ok"}]},
            {"messages": [long_turn, {"role": "assistant", "content": "ok"}]}]
    db = tmp_path / "cut.db"
    result = run("train", "--chat", write_jsonl(tmp_path / "c.jsonl", rows), "--base", base,
                 "--db", db, "--iters", "2", "--val-fraction", "0")
    assert result.exit_code == 0, result.output
    state = store.read_train_state(store.open_database(db))
    assert (state["chat"]["conversations"], state["chat"]["cut"], state["chat"]["dropped"]) \
        == (2, 1, 1)


@pytest.mark.parametrize("args,text", [
    (["corpus.txt"], "give no corpus too"),
    (["--chat-template", "t.jinja"], "--chat-template goes with --chat"),
])
def test_chat_options_that_do_not_fit_are_refused(base, tmp_path, args, text):
    data = write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)
    (tmp_path / "corpus.txt").write_text("hello")
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    chat = [] if "--chat-template" in args else ["--chat", data]
    args = [str(tmp_path / a) if a.endswith((".txt", ".jinja")) else a for a in args]
    result = run("train", *chat, *args, "--base", base, "--db", tmp_path / "x.db")
    assert result.exit_code != 0 and text in result.output
    no_base = run("train", "--chat", data, "--db", tmp_path / "y.db")
    assert no_base.exit_code == 1 and "name it with --base" in no_base.output


def test_a_chat_template_file_is_kept_with_the_model(base, tmp_path):
    template = ("{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ bos_token }}"
                "[assistant] {% endif %}")
    (tmp_path / "t.jinja").write_text(template)
    db = tmp_path / "t.db"
    result = run("train", "--chat", write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS * 4),
                 "--base", base, "--db", db, "--iters", "2", "--chat-template",
                 tmp_path / "t.jinja")
    assert result.exit_code == 0, result.output
    model = sqlgpt.load(db)
    assert model.chat_template == template
    prompt = model.chat_prompt([{"role": "user", "content": "hi"}])
    assert model.tokenizer.decode(prompt) == "[user] hi[assistant] "
    # and a fine-tune of it keeps it too
    again = tmp_path / "again.db"
    assert run("train", "--chat", tmp_path / "c.jsonl", "--base", db, "--db", again,
               "--iters", "1").exit_code == 0
    assert sqlgpt.load(again).chat_template == template


# ---- beam search ----

@pytest.fixture(scope="module")
def tiny_decoder():
    arch = preset("llama", n_vocab=5, embed_dim=16, num_heads=2, num_layers=1, seq_len=16)
    model = GPT(arch)
    model.init_weights(np.random.default_rng(3))
    for t in model.params:  # sharper distributions than init's, so orders differ
        t.data[...] *= 4.0 if t.data.ndim == 2 else 1.0
    return model


def brute_force(model, prompt, length):
    """Every continuation of `length` ids with its summed log-probability."""
    out = []
    for tail in itertools.product(range(model.arch.n_vocab), repeat=length):
        seq = np.array(prompt + list(tail), dtype=np.int32)[None]
        model.forward(seq)
        logits = model.acts.logits[:seq.shape[1]]
        lp = sum(log_softmax(logits[len(prompt) - 1 + i])[t] for i, t in enumerate(tail))
        out.append((float(lp), list(tail)))
    return sorted(out, key=lambda p: -p[0])


def test_beam_search_with_enough_beams_finds_the_brute_force_best(tiny_decoder):
    prompt, length = [1, 2], 3
    exact = brute_force(tiny_decoder, prompt, length)
    beams = beam_search(Decoder(tiny_decoder, slots=25), prompt, 25, length, length_penalty=0)
    assert [b.ids for b in beams[:5]] == [ids for _, ids in exact[:5]]
    for beam, (lp, _) in zip(beams[:5], exact):
        assert abs(beam.logprob - lp) < 1e-4 and not beam.finished
    few = beam_search(Decoder(tiny_decoder, slots=2), prompt, 2, length, length_penalty=0)
    assert few[0].logprob <= exact[0][0] + 1e-6


def test_one_beam_is_greedy(tiny_decoder):
    greedy, seq = [], [1, 2]
    for _ in range(6):
        tiny_decoder.forward(np.array(seq, dtype=np.int32)[None])
        token = int(np.argmax(tiny_decoder.acts.logits[len(seq) - 1]))
        greedy.append(token)
        seq.append(token)
    beams = beam_search(Decoder(tiny_decoder, slots=1), [1, 2], 1, 6)
    assert beams[0].ids == greedy


def test_beams_end_at_the_end_token_and_rank_by_the_length_penalty(tiny_decoder):
    beams = beam_search(Decoder(tiny_decoder, slots=4), [1, 2], 4, 8, length_penalty=1.0,
                        end_id=0)
    assert all(b.finished == (len(b.ids) < 8) or b.finished for b in beams)
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    for b in beams:
        n = len(b.ids) + (1 if b.finished else 0)
        assert abs(b.score - b.logprob / n) < 1e-9 and 0 not in b.ids


def test_generate_num_beams_prints_every_beam(base):
    result = run("generate", "--db", base, "--prompt", "KING", "--num-beams", "3",
                 "--max-tokens", "5", "--json")
    assert result.exit_code == 0, result.output
    beams = json.loads(result.output)["beams"]
    assert len(beams) == 3 and beams[0]["score"] >= beams[1]["score"] >= beams[2]["score"]
    model = sqlgpt.load(base)
    assert beams[0]["text"] == model.beam_search("KING", 3, 5)[0].text
    for args, text in ((["--num-beams", "0"], "0"), (["--num-beams", "2", "--num-samples", "2"],
                                                      "searches one prompt")):
        bad = run("generate", "--db", base, *args)
        assert bad.exit_code == 2 and text in bad.output


# ---- the REPL through a pseudo-terminal ----

def read_until(fd, wanted, timeout=60):
    seen, end = b"", time.monotonic() + timeout
    while wanted not in seen:
        if time.monotonic() > end:
            raise AssertionError(f"no {wanted!r} in {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_the_chat_repl_in_a_terminal(tuned, tmp_path):
    parent, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", "from sqlgpt.cli import main; main()", "chat",
                             "--db", str(tuned), "--temperature", "0", "--max-tokens", "8",
                             "--system", "Be brief."],
                            stdin=child, stdout=child, stderr=child, cwd=tmp_path, close_fds=True)
    os.close(child)
    try:
        read_until(parent, b"> ")
        os.write(parent, b"Reverse: one two\n")
        first = read_until(parent, b"> ")
        model = sqlgpt.load(tuned)
        want = model.chat([{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Reverse: one two"}], temperature=0,
                          max_tokens=8)
        assert want and want.encode() in first.replace(b"\r\n", b"\n")
        os.write(parent, b"/reset\n")
        assert b"forgotten" in read_until(parent, b"> ")
        os.write(parent, b"/system\n")
        assert b"removed" in read_until(parent, b"> ")
        os.write(parent, b"\x04")  # Ctrl-D quits
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(parent)


# ---- learning ----

def reversal_rows(words, n, rng):
    return [{"prompt": f"Reverse: {a} {b}", "completion": f"{b} {a}"}
            for a, b in (rng.sample(words, 2) for _ in range(n))]


def test_a_small_model_learns_to_follow_a_held_out_instruction(tmp_path):
    """Reversing two words it never saw in training: exact answers far
    above chance (none, for a model that was not fine-tuned)."""
    import random
    import re
    text = CORPUS.read_text()[:300000]
    (tmp_path / "corpus.txt").write_text(text)
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{3,5}", text)})
    rng = random.Random(0)
    rng.shuffle(words)
    held = words[:len(words) // 5]
    write_jsonl(tmp_path / "train.jsonl", reversal_rows(words[len(words) // 5:], 3000, rng))
    test = reversal_rows(held, 60, rng)
    base, tuned = tmp_path / "base.db", tmp_path / "tuned.db"
    assert run("train", tmp_path / "corpus.txt", "--db", base, "--preset", "gpt2",
               "--embed-dim", "64", "--heads", "4", "--layers", "2", "--seq-len", "64",
               "--iters", "100", "--vocab-size", "300", "--lr", "0.003").exit_code == 0
    result = run("train", "--chat", tmp_path / "train.jsonl", "--base", base, "--db", tuned,
                 "--iters", "400", "--lr", "0.003", "--batch-size", "16")
    assert result.exit_code == 0, result.output

    def exact(db):
        model = sqlgpt.load(db)
        return sum(model.chat([{"role": "user", "content": r["prompt"]}], temperature=0,
                              max_tokens=16).strip() == r["completion"] for r in test) / len(test)
    assert exact(base) == 0
    assert exact(tuned) >= 0.15


def test_exports_carry_the_template_and_transformers_chats_alike(tuned, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = sqlgpt.load(tuned)
    messages = [{"role": "user", "content": "Reverse: one two"}]
    assert run("export", "--db", tuned, "-o", tmp_path / "hf").exit_code == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                  return_tensors="pt")
    assert ids["input_ids"][0].tolist() == model.chat_prompt(messages).tolist()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    out = hf_model.generate(**ids, max_new_tokens=8, do_sample=False,
                            eos_token_id=tok.eos_token_id)
    reply = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply == model.chat(messages, temperature=0, max_tokens=8)
    # back in from the directory, and through GGUF, with the template
    (tmp_path / "hf" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert run("import", tmp_path / "hf", "--db", tmp_path / "back.db").exit_code == 0
    assert sqlgpt.load(tmp_path / "back.db").chat_template == "{{ messages[0]['content'] }}"
    pytest.importorskip("gguf")
    assert run("export", "--db", tuned, "--format", "gguf", "-o", tmp_path / "m.gguf"
               ).exit_code == 0
    assert run("import", tmp_path / "m.gguf", "--db", tmp_path / "g.db").exit_code == 0
    assert sqlgpt.load(tmp_path / "g.db").chat_template == model.chat_format().template


def test_eval_chat_scores_the_replies(tuned, tmp_path):
    data = write_jsonl(tmp_path / "held.jsonl", CONVERSATIONS)
    result = run("eval", "--db", tuned, "--chat", data, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["conversations"] == 3 and 0 <= scores["exact_match"] <= 1
    model = sqlgpt.load(tuned)
    hits = sum(model.chat([{k: v for k, v in m.items()} for m in c["messages"][:-1]],
                          temperature=0).strip() == c["messages"][-1]["content"]
               for c in CONVERSATIONS[:2])
    hits += model.chat([{"role": "user", "content": "Reverse: cat dog"}],
                       temperature=0).strip() == "dog cat"
    assert scores["exact_match"] == hits / 3
    assert run("eval", "--db", tuned).exit_code == 2
