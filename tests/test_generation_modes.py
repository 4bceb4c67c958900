"""Generation beyond one stream: batched decode steps, the sampling filters
(statistically), stop strings, speculative decoding, long contexts, the
CLI's batch, JSON and interactive modes, and their bad input."""
import json
import os
import pty
import select
import shutil
import signal
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt.cli import main
from sqlgpt.errors import SqlgptError
from sqlgpt.inference.decoder import Decoder
from sqlgpt.inference.sampling import Rng, Sampler
from sqlgpt.inference.generate import (GenerationStats, generate_batch, generate_ids,
                                       speculative_ids)
from sqlgpt.model.model import GPT

from architectures import ARCHITECTURES, arch_of
from conftest import TINY
from test_generate import initialized

# the 99.9% quantile of the chi-square distribution by degrees of freedom
CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26,
            32.91, 34.53, 36.12, 37.70]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def chi_square_ok(counts, probs, draws):
    """Pearson's statistic over categories expected at least 5 times (the
    rest pooled) below the 99.9% quantile."""
    expected = probs * draws
    big = expected >= 5
    observed = list(counts[big]) + [counts[~big].sum()]
    wanted = list(expected[big]) + [expected[~big].sum()]
    if wanted[-1] < 5:  # too little to pool: fold it into the largest
        observed, wanted = observed[:-1], wanted[:-1]
        observed[int(np.argmax(wanted))] += counts[~big].sum()
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, wanted))
    df = len(wanted) - 1
    return df == 0 or stat < CHI2_999[df - 1], (stat, df)


# ---- batched decode ----
@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batched_rows_equal_single_sequence_decoding(rng, name, precision):
    """Three sequences of different lengths in one decode step per token,
    prompts fed whole: every row's logits are the ones it gets alone."""
    model = initialized(arch_of(name, seq_len=24), rng, 0.05)
    V = model.arch.n_vocab
    prompts = [rng.integers(0, V, n).tolist() for n in (1, 5, 9)]
    alone = []
    for prompt in prompts:
        d = Decoder(model, precision)
        rows = [d.step(t).copy() for t in prompt]
        alone.append(rows)
    batch = Decoder(model, precision, slots=3)
    slots = [i for i, p in enumerate(prompts) for _ in p]
    tokens = [t for p in prompts for t in p]
    positions = [t for p in prompts for t in range(len(p))]
    logits = batch.run(slots, tokens, positions, range(len(tokens)))
    expected = np.array([row for rows in alone for row in rows])
    assert np.max(np.abs(logits - expected)) <= 1e-5 * max(1.0, np.abs(expected).max())
    # then one token each, as generation goes on
    nxt = rng.integers(0, V, 3).tolist()
    step = batch.run([0, 1, 2], nxt, [len(p) for p in prompts], [0, 1, 2])
    for i, prompt in enumerate(prompts):
        d = Decoder(model, precision)
        d.prefill(prompt)
        assert np.max(np.abs(step[i] - d.step(nxt[i]))) <= 1e-5 * max(1.0, np.abs(step[i]).max())


def test_batched_generation_is_what_each_sequence_gives_alone(rng):
    model = initialized(arch_of("gpt2", seq_len=16), rng, 0.05)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    sampler = Sampler(temperature=0.9, top_k=20)
    out = {i: [] for i in range(3)}
    for i, token in generate_batch(Decoder(model, slots=3), prompts, 40, sampler, seed=11):
        out[i].append(token)  # 40 tokens: past the context of 16, so windows slide
    for i, prompt in enumerate(prompts):
        assert out[i] == list(generate_ids(Decoder(model), prompt, 40, 0.9, 20, seed=11 + i))


def test_the_api_batch_and_the_cli_agree(trained_db):
    m = sqlgpt.load(trained_db)
    prompts = ["the king", "my lord"]
    stats = GenerationStats()
    batch = m.generate(prompts, max_tokens=12, seed=5, temperature=0.8, stats=stats)
    assert batch == [m.generate(p, max_tokens=12, seed=5 + i, temperature=0.8)
                     for i, p in enumerate(prompts)]
    assert 0 < stats.tokens <= 24
    lines = run("generate", "--db", trained_db, "--prompt", "the king", "--num-samples", 2,
                "--max-tokens", 12, "--seed", 5, "--temperature", 0.8, "--json")
    assert lines.exit_code == 0, lines.output
    rows = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [r["text"] for r in rows] == [m.generate("the king", max_tokens=12, seed=5 + i,
                                                    temperature=0.8) for i in range(2)]
    assert all(r["tokens"] <= 12 and r["tokens_per_s"] > 0 for r in rows)
    for flag in ("--stream", "--no-stream"):
        one = run("generate", "--db", trained_db, "--prompt", "the king", "--max-tokens", 12,
                  "--seed", 5, "--temperature", 0.8, flag)
        assert one.exit_code == 0, one.output
        assert one.stdout.rstrip("\n") == batch[0]


def test_prompts_file(tmp_path, trained_db):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the king\nmy lord\nthe\n")
    result = run("generate", "--db", trained_db, "--prompts-file", prompts, "--max-tokens", 6,
                 "--seed", 1, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["the king", "my lord", "the"]
    m = sqlgpt.load(trained_db)
    assert [r["text"] for r in rows] == m.generate(["the king", "my lord", "the"],
                                                   max_tokens=6, seed=1)


# ---- sampling, statistically ----
def reference_probs(logits, context, temperature, top_k, top_p, min_p, penalty):
    """The filtered distribution, computed here independently of Sampler."""
    z = np.array(logits, dtype=np.float64)
    for t in set(context):
        z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
    p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = set(order[:top_k] if top_k else order)
    p = np.array([p[i] if i in keep else 0.0 for i in range(len(p))])
    p /= p.sum()  # the nucleus is of what top-k kept
    mass, nucleus = 0.0, set()
    for i in order:
        if mass >= top_p:
            break
        nucleus.add(i)
        mass += p[i]
    q = np.array([p[i] if i in nucleus else 0.0 for i in range(len(p))])
    q /= q.sum()
    q = np.where(q >= min_p * q.max(), q, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=1.7, top_k=5),
    dict(temperature=1.0, top_p=0.8), dict(temperature=1.2, min_p=0.1),
    dict(temperature=1.0, repetition_penalty=1.8),
    dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sampled_frequencies_follow_the_filtered_distribution(rng, settings):
    logits = rng.normal(0, 1.5, 12)
    context = [0, 3, 3, 7]
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    full.update(settings)
    probs = reference_probs(logits, context, full["temperature"], full["top_k"],
                            full["top_p"], full["min_p"], full["repetition_penalty"])
    sampler = Sampler(**full)
    assert np.allclose(sampler.probs(logits, context), probs)
    draws = 20000
    draw_rng = Rng(int(rng.integers(2**63)))
    counts = np.bincount([sampler.sample(logits, draw_rng, context) for _ in range(draws)],
                         minlength=12)
    assert counts[probs == 0].sum() == 0  # nothing filtered out is ever drawn
    ok, detail = chi_square_ok(counts, probs, draws)
    assert ok, detail


def numpy_sample(settings, logits, rng, context, banned):
    """The sampler as sqlgpt first wrote it, in numpy (the definition the C
    sampler must keep: the same token for the same seed)."""
    t, top_k, top_p, min_p, penalty = (settings[k] for k in (
        "temperature", "top_k", "top_p", "min_p", "repetition_penalty"))
    z = np.asarray(logits, dtype=np.float64).copy()
    if penalty != 1.0 and len(context):
        seen = np.unique(np.asarray(context, dtype=np.int64))
        z[seen] = np.where(z[seen] > 0, z[seen] / penalty, z[seen] * penalty)
    if len(banned):
        z[list(banned)] = -np.inf
    if t == 0:
        return int(np.argmax(z))
    z = (z - z.max()) / t
    if 0 < top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    if min_p > 0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def test_the_c_sampler_draws_what_the_numpy_definition_draws(rng):
    for case in range(400):
        V = int(rng.choice([2, 7, 50, 300, 5000]))
        logits = (rng.normal(0, rng.uniform(0.1, 6), V)).astype(np.float32)
        if case % 7 == 0:
            logits[rng.integers(0, V, 3)] = logits.max()  # ties
        settings = dict(temperature=float(rng.choice([0, 0.3, 0.8, 1.0, 2.5])),
                        top_k=int(rng.choice([0, 0, 1, 5, V])),
                        top_p=float(rng.choice([1.0, 1.0, 0.5, 0.9, 0.999])),
                        min_p=float(rng.choice([0.0, 0.0, 0.05, 0.3])),
                        repetition_penalty=float(rng.choice([1.0, 1.0, 1.3, 0.7])))
        context = rng.integers(0, V, int(rng.integers(0, 30))).tolist()
        banned = [int(b) for b in rng.integers(0, V, int(rng.integers(0, 3)))]
        if len(set(banned)) >= V:
            banned = []
        seed = int(rng.integers(2**63))
        ours, theirs = Rng(seed), np.random.default_rng(seed)
        sampler = Sampler(**settings)
        for _ in range(3):  # the streams stay in step
            assert sampler.sample(logits, ours, context, banned) == \
                numpy_sample(settings, logits, theirs, context, banned), (case, settings)
        assert ours.random() == theirs.random()


def test_greedy_with_a_repetition_penalty_avoids_the_repeat():
    logits = np.array([2.0, 1.9, -1.0])
    assert Sampler(temperature=0).sample(logits, None, [0]) == 0
    assert Sampler(temperature=0, repetition_penalty=1.2).sample(logits, None, [0]) == 1


@pytest.mark.parametrize("settings", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                      dict(min_p=-0.1), dict(min_p=2), dict(top_k=-1),
                                      dict(repetition_penalty=0), dict(repetition_penalty=-2),
                                      dict(temperature=float("nan"))])
def test_bad_sampling_settings_are_errors(settings):
    with pytest.raises(SqlgptError):
        Sampler(**settings)


# ---- stop strings ----
def test_stop_strings_end_the_text_and_streaming_agrees(trained_db):
    m = sqlgpt.load(trained_db)
    full = m.generate("the", max_tokens=40, seed=3)
    generated = full[len("the"):]
    word = next(w for w in generated.split() if len(w) > 2)
    stopped = m.generate("the", max_tokens=40, seed=3, stop=[word])
    assert stopped == "the" + generated[:generated.index(word)]
    pieces = list(m.stream("the", max_tokens=40, seed=3, stop=[word]))
    assert "".join(pieces) == stopped
    assert all(word not in p for p in pieces)
    result = run("generate", "--db", trained_db, "--prompt", "the", "--max-tokens", 40,
                 "--seed", 3, "--stop", word, "--stop", "zzzz", "--stream")
    assert result.exit_code == 0 and result.stdout.rstrip("\n") == stopped
    with pytest.raises(SqlgptError, match="stop string"):
        m.generate("the", stop=[""])


# ---- long contexts ----
@pytest.mark.parametrize("name", ["lua", "gpt2", "llama"])
def test_generating_past_the_context_slides_the_window(rng, name):
    model = initialized(arch_of(name, seq_len=8), rng, 0.05)
    tokens = list(generate_ids(Decoder(model), [1, 2, 3], 50, temperature=1.0, seed=0))
    assert len(tokens) == 50 and all(0 <= t < model.arch.n_vocab for t in tokens)
    long_prompt = rng.integers(0, model.arch.n_vocab, 30).tolist()  # cut to its last 8
    assert list(generate_ids(Decoder(model), long_prompt, 5, 0)) == \
        list(generate_ids(Decoder(model), long_prompt[-8:], 5, 0))


def test_a_long_prompt_is_cut_with_a_note(trained_db):
    words = " ".join(["the king"] * 40)  # seq_len 16
    result = run("generate", "--db", trained_db, "--prompt", words, "--max-tokens", 5)
    assert result.exit_code == 0, result.output
    assert "longer than the model's context of 16" in result.stderr


# ---- speculative decoding ----
@pytest.fixture(scope="module")
def draft_db(tmp_path_factory, small_corpus):
    """A smaller model with the trained_db's tokenizer (same corpus, same vocab size)."""
    db = tmp_path_factory.mktemp("draft") / "draft.db"
    tiny = [a for a in TINY]
    tiny[tiny.index("--layers") + 1] = "1"
    tiny[tiny.index("--embed-dim") + 1] = "16"
    result = run("train", small_corpus, "--db", db, "--iters", 10, *tiny)
    assert result.exit_code == 0, result.output
    return db


def test_speculative_greedy_gives_the_targets_tokens(trained_db, draft_db):
    target, draft = sqlgpt.load(trained_db), sqlgpt.load(draft_db)
    stats = GenerationStats()
    ours = target.generate("the king", max_tokens=40, temperature=0, draft=draft, stats=stats)
    assert ours == target.generate("the king", max_tokens=40, temperature=0)
    assert stats.proposed > 0 and 0 < stats.tokens <= 40
    result = run("generate", "--db", trained_db, "--draft-db", draft_db, "--prompt", "the king",
                 "--max-tokens", 40, "--temperature", 0, "--no-stream")
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == ours
    assert "proposed tokens accepted" in result.stderr


@pytest.mark.parametrize("name", ["lua", "llama"])
def test_speculative_sampling_follows_the_targets_distribution(name):
    """The first two tokens after a prompt, over many seeds: the first is
    distributed as the target's p, whatever the draft (here the target with
    noise added, so that proposals are both kept and rejected), and so is the
    second given the first. The models and draws come from fixed seeds: a
    chi-square test fails by chance on some (the next test checks the draws on
    fresh models exactly)."""
    rng = np.random.default_rng(0)
    arch = arch_of(name, seq_len=16, n_vocab=12)
    target = initialized(arch, rng, 0.3)
    draft = GPT(arch)
    for t in draft.params:
        t.data[...] = target.params[t.name].data + 0.1 * rng.standard_normal(t.shape)
    sampler = Sampler(temperature=4.0)  # flat enough that both models give most tokens a chance
    prompt = [1, 2]
    p1 = sampler.probs(Decoder(target).prefill(prompt))
    big, small = Decoder(target), Decoder(draft)
    stats = GenerationStats()
    draws = 3000
    firsts, pairs = [], []
    for seed in range(draws):
        first, second = speculative_ids(big, small, prompt, 2, sampler, seed, draft_tokens=3,
                                        stats=stats)
        firsts.append(first)
        pairs.append((first, second))
    ok, detail = chi_square_ok(np.bincount(firsts, minlength=12), p1, draws)
    assert ok, detail
    common = int(np.argmax(p1))
    seconds = [b for a, b in pairs if a == common]
    p2 = sampler.probs(Decoder(target).prefill(prompt + [common]))
    ok, detail = chi_square_ok(np.bincount(seconds, minlength=12), p2, len(seconds))
    assert ok, detail
    assert 0 < stats.accepted < stats.proposed  # both branches ran


def reference_speculative(target, draft, prompt, n, draft_tokens, sampler, seed):
    """The textbook algorithm (propose k from q, keep each with min(1, p/q),
    else draw from max(p - q, 0); a bonus token when all are kept), every
    distribution from a fresh prefill, drawing from numpy's own generator."""
    r, context, out = np.random.default_rng(seed), list(prompt), []
    dist = lambda model, ids: sampler.probs(Decoder(model).prefill(ids))  # noqa: E731
    while len(out) < n:
        k, proposals, qs, new = min(draft_tokens, n - len(out) - 1), [], [], []
        for _ in range(k):
            qs.append(dist(draft, context + proposals))
            proposals.append(int(r.choice(qs[-1].size, p=qs[-1])))
        for i in range(k + 1):
            p = dist(target, context + new)
            if i == k:
                new.append(int(r.choice(p.size, p=p)))
            elif r.random() < min(1.0, p[proposals[i]] / qs[i][proposals[i]]):
                new.append(proposals[i])
                continue
            else:
                residual = np.maximum(p - qs[i], 0.0)
                new.append(int(r.choice(p.size, p=residual / residual.sum())))
            break
        context += new[:n - len(out)]
        out += new[:n - len(out)]
    return out


@pytest.mark.parametrize("name", ["lua", "llama"])
def test_speculative_sampling_draws_what_the_textbook_algorithm_draws(name, rng):
    """Seed for seed, on fresh random models, the tokens are those of the
    algorithm written out plainly over numpy's generator (the C sampler draws
    numpy's stream). Logits from the cache and from a prefill may differ in
    the last bits, which can flip a draw right at a boundary: one in 200 may
    differ."""
    arch = arch_of(name, seq_len=16, n_vocab=12)
    target = initialized(arch, rng, 0.3)
    draft = GPT(arch)
    for t in draft.params:
        t.data[...] = target.params[t.name].data + 0.1 * rng.standard_normal(t.shape)
    sampler = Sampler(temperature=4.0)
    big, small = Decoder(target), Decoder(draft)
    prompt, first = [1, 2], int(rng.integers(2**40))
    stats = GenerationStats()
    differ = sum(list(speculative_ids(big, small, prompt, 6, sampler, seed, draft_tokens=3,
                                      stats=stats))
                 != reference_speculative(target, draft, prompt, 6, 3, sampler, seed)
                 for seed in range(first, first + 200))
    assert differ <= 1
    assert 0 < stats.accepted < stats.proposed  # both branches ran


# ---- bad input ----
def test_bad_generation_input_is_one_line(tmp_path, trained_db, small_corpus):
    empty_line = tmp_path / "gap.txt"
    empty_line.write_text("the king\n\nmy lord\n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\xff\xfe" * 10)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    char_db = tmp_path / "char.db"
    assert run("train", small_corpus, "--db", char_db, "--iters", 2, "--tokenizer", "char",
               *TINY[:-2]).exit_code == 0
    cases = [
        (["--prompts-file", tmp_path / "missing.txt"], 1, "cannot read the prompts file"),
        (["--prompts-file", empty_line], 1, "line 2"),
        (["--prompts-file", binary], 1, "prompts file"),
        (["--prompts-file", empty], 1, "is empty"),
        (["--draft-db", char_db], 1, "tokenizer"),
        (["--draft-db", tmp_path / "nope.db"], 1, "does not exist"),
        (["--repetition-penalty", -1], 2, "repetition-penalty"),
        (["--min-p", 2], 2, "min-p"),
        (["--num-samples", 0], 2, "num-samples"),
        (["--draft-db", char_db, "--num-samples", 2], 2, "one sequence at a time"),
        (["--stop", ""], 1, "stop string"),
    ]
    for args, code, message in cases:
        result = run("generate", "--db", trained_db, "--max-tokens", 3, *args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output + result.stderr, (args, result.output, result.stderr)
        assert "Traceback" not in result.output + result.stderr


# ---- interactive, through a pseudo-terminal ----
class Terminal:
    """What a pseudo-terminal's program writes, read up to markers; bytes
    after a marker that came in the same read are kept for the next one."""

    def __init__(self, fd):
        self.fd, self.pending = fd, b""

    def read_until(self, marker, timeout=60):
        out, self.pending = self.pending, b""
        end = time.time() + timeout
        while marker not in out:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.time()))
            if not ready:
                raise AssertionError(f"no {marker!r} in {out!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if marker in out:
            cut = out.index(marker) + len(marker)
            out, self.pending = out[:cut], out[cut:]
        return out


def test_interactive_answers_stops_on_ctrl_c_and_quits_on_ctrl_d(trained_db):
    sqlgpt_cli = shutil.which("sqlgpt")
    command = [sqlgpt_cli] if sqlgpt_cli else [sys.executable, "-m", "sqlgpt.cli"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the terminal
        # Ctrl-C as a user's shell delivers it, also where pytest runs as a
        # background job (which inherits SIGINT ignored, as exec keeps it)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(command[0], command + ["generate", "--db", str(trained_db), "--interactive",
                                        "--max-tokens", "100000", "--seed", "1"])
    terminal = Terminal(fd)
    try:
        terminal.read_until(b"> ")
        os.write(fd, b"the king\r")
        answer = terminal.read_until(b"the king")  # the echo, then the answer streams
        answer += terminal.read_until(b" ", timeout=30)
        time.sleep(0.5)
        os.write(fd, b"\x03")  # Ctrl-C: ends this answer, not the program
        answer += terminal.read_until(b"[stopped]")
        terminal.read_until(b"> ")
        os.write(fd, b"\x04")  # Ctrl-D at the prompt quits
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_generations_side_by_side_do_not_share_a_cache(trained_db):
    m = sqlgpt.load(trained_db)
    alone = m.generate("the king", max_tokens=20, temperature=0)
    stream = m.stream("the king", max_tokens=20, temperature=0)
    pieces = [next(stream), next(stream)]
    other = m.stream("my lord", max_tokens=5, temperature=0)
    next(other), next(other)
    m.complete(["the", "my lord", "the king"], max_tokens=4)
    assert "".join(pieces + list(stream)) == alone


def test_bad_decode_steps_are_refused_before_the_kernel(rng):
    d = Decoder(initialized(arch_of("lua", seq_len=8), rng, 0.05), slots=2)
    for slots, tokens, positions, rows in (([2], [1], [0], [0]), ([-1], [1], [0], [0]),
                                           ([0], [1], [0], [0] * 4), ([0], [1], [0], [1]),
                                           ([0, 1], [1], [0], [0]), ([0], [1], [8], [0])):
        with pytest.raises(SqlgptError):
            d.run(slots, tokens, positions, rows)

