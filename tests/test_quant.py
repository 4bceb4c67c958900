"""int8 / int4 weights: the groups' round trip within the format's bound, the
kernel's integer products against float64 sums of the same quantized
values, decoding from them (batched and alone alike), their loss on
held-out text, and the quantize command's refusals."""
import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt._kernel import ffi, lib
from sqlgpt.errors import SqlgptError
from sqlgpt.model.arch import preset
from sqlgpt.cli import main
from sqlgpt.inference.decoder import Decoder
from sqlgpt.model.lora import merged
from sqlgpt.model.model import GPT
from sqlgpt.model.quant import dequantize, kernel_block, matrices, quantize, quantized_copy
from sqlgpt.model.tensor import fptr

from architectures import ARCHITECTURES, arch_of
from conftest import CORPUS


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_round_trip_error_is_within_half_a_step_per_group(rng, bits, group):
    C, OC = 128, 40
    w = (rng.standard_normal((C, OC)) * rng.uniform(0.01, 3, (1, OC))).astype(np.float32)
    w[:group, 0] = 0.0  # an all-zero group: scale 0, values back exactly
    q, scales = quantize(w, bits, group)
    back = dequantize(q, scales, C, bits, group)
    step = np.repeat(np.abs(scales), group, axis=1).T  # (C, OC): each value's group's step
    err = np.abs(back - w)
    # Levels are rounded against the exact scale, which is then stored in
    # float32: up to 128 levels times half an ulp of the scale, plus the float32
    # product's own rounding, may add to the half step.
    slack = 128 * step * 2.0**-24 + np.abs(w) * 2.0**-24 + 1e-30
    if bits == 8:
        assert (err <= step / 2 + slack).all()
    else:  # the largest magnitude is exact (-8 steps); its opposite may clamp at +7
        assert (err <= step + slack).all()
        inside = np.abs(w) <= 7 * step
        assert (err[inside] <= step[inside] / 2 + slack[inside]).all()
    assert (back[:group, 0] == 0).all()
    levels = q.view(np.int8) if bits == 8 else \
        np.concatenate([q & 15, q >> 4], axis=1).astype(np.int64) - 8
    assert np.abs(levels).max() <= (127 if bits == 8 else 8)


def c_quantize_q8(x, group):
    q = np.zeros(2 * x.size, np.int8)
    scales = np.zeros(x.size // group, np.float32)
    lib.quantize_q8(ffi.from_buffer("int8_t[]", q), fptr(scales), fptr(x), x.size, group)
    return q, scales


def test_activations_quantize_as_the_weights_do(rng):
    x = (rng.standard_normal(256) * 2).astype(np.float32)
    q, scales = c_quantize_q8(x, 32)
    ref_q, ref_scales = quantize(x.reshape(-1, 1), 8, 32)  # a (256, 1) matrix: one row of x
    assert np.array_equal(q[:256], ref_q.view(np.int8)[0])
    assert np.array_equal(np.abs(q[:256]), q[256:])
    np.testing.assert_allclose(scales, ref_scales[0], rtol=1e-7)


def test_activations_round_ties_to_even_as_the_weights_do(rng):
    """Groups whose scale is 1 (a magnitude of 127), the rest of their
    values halfway between two levels: each vector path rounds them to even,
    as rint does."""
    x = (rng.integers(-254, 255, 128) / 2).astype(np.float32)
    x[::32] = 127.0
    q, scales = c_quantize_q8(x, 32)
    assert np.array_equal(scales, np.ones(4, np.float32))
    assert np.array_equal(q[:128], np.rint(x).astype(np.int8))
    assert np.array_equal(q[128:], np.abs(np.rint(x)).astype(np.int8))


def test_activations_with_nan_and_inf_quantize_to_defined_values(rng):
    x = (rng.standard_normal(64) * 2).astype(np.float32)
    x[3], x[40] = np.nan, np.inf
    q, scales = c_quantize_q8(x, 32)
    ref_q, ref_scales = quantize(np.where(np.isnan(x), 0, x)[:32].reshape(-1, 1), 8, 32)
    assert q[3] == 0 and np.array_equal(np.delete(q[:32], 3), np.delete(ref_q.view(np.int8)[0], 3))
    assert scales[0] == ref_scales[0][0]  # the NaN does not count in the group's magnitude
    assert scales[1] == np.inf and not q[32:64].any()  # inf * 0 is NaN: each becomes 0


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("C,OC,n", [(192, 70, 3), (288, 9, 6), (64, 5, 1), (576, 13, 9),
                                    (128, 48, 7), (96, 16, 1)])
@pytest.mark.parametrize("half_scales", [False, True])
def test_integer_products_equal_float64_sums_of_the_same_values(rng, bits, group, C, OC, n,
                                                               half_scales):
    """Tiles of rows and outputs with their remainders (the kernel arranges
    outputs in blocks of quant_lanes(): whole blocks, odd and even counts of
    them, and the rows after the last), a last half pair of 32 values (C =
    288), and scales that are all halves exactly (an import's), which the
    arranged layout keeps as halves."""
    if C % group:
        pytest.skip("groups must divide C")
    w = rng.standard_normal((C, OC)).astype(np.float32)
    x = rng.standard_normal((n, C)).astype(np.float32)
    q, scales = quantize(w, bits, group)
    if half_scales:
        scales = scales.astype(np.float16).astype(np.float32)
    y = np.zeros((n, OC), np.float32)
    assert lib.quant_matmul(fptr(y), fptr(x), n, fptr(kernel_block(q, scales)), C, OC, bits,
                            group) == 0
    packed = q.reshape(OC, -1, 16).astype(np.int64)  # int4: 16 bytes per 32 values
    wq = (q.view(np.int8).astype(np.int64) if bits == 8 else
          np.concatenate([packed & 15, packed >> 4], axis=2).reshape(OC, C) - 8)
    for r in range(n):
        xq, xs = c_quantize_q8(x[r].copy(), group)
        sums = (wq.reshape(OC, -1, group) * xq[:C].astype(np.int64).reshape(1, -1, group)
                ).sum(axis=2)  # exact integers per (output, group)
        expected = (sums * scales.astype(np.float64) * xs.astype(np.float64)).sum(axis=1)
        np.testing.assert_allclose(y[r], expected, rtol=2e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("OC", [5, 16, 40, 64])
@pytest.mark.parametrize("half_scales", [False, True])
def test_arranged_outputs_read_back_as_their_rows(rng, bits, group, OC, half_scales):
    """quant_arrange, then quant_row_values of each output: the values of
    its row as stored (embeddings are looked up this way in a tied head)."""
    C = 128
    q, scales = quantize(rng.standard_normal((C, OC)).astype(np.float32), bits, group)
    if half_scales:
        scales = scales.astype(np.float16).astype(np.float32)
    block = kernel_block(q, scales)
    before = block.copy()
    assert lib.quant_arrange(fptr(block), C, OC, bits, group) == 0
    lanes = lib.quant_lanes()
    if lanes and OC >= lanes:
        assert not np.array_equal(block, before)  # rearranged, not left as it was
    expected = dequantize(q, scales, C, bits, group).T  # (OC, C)
    row = np.zeros(C, np.float32)
    for j in range(OC):
        lib.quant_row_values(fptr(row), fptr(block), C, OC, bits, group, j)
        np.testing.assert_array_equal(row, expected[j])


def quantized_of(model, bits, group=32):
    return quantized_copy(model.arch, merged(model), bits, group)


@pytest.mark.parametrize("name", ["lua", "gpt2", "llama"])
@pytest.mark.parametrize("bits", [8, 4])
def test_decoding_from_integers_follows_the_dequantized_model(rng, name, bits):
    arch = preset(name, n_vocab=70, embed_dim=64, num_heads=4, num_layers=2, seq_len=24,
                  **({"kv_heads": 2} if name == "llama" else {}))
    model = GPT(arch)
    model.init_weights(rng)  # trained-like scales: N(0, 1) weights would explode activations
    for t in model.params:
        if t.spec.init[0] in ("ones", "zeros"):
            t.data[...] += 0.1 * rng.standard_normal(t.shape)
    blocks = quantized_of(model, bits)
    dequantized = GPT(arch)
    for t in dequantized.params:
        t.data[...] = model.params[t.name].data
    for spec in matrices(arch):
        if not spec.tied_to:
            dequantized.params[spec.name].data[...] = dequantize(*blocks[spec.name],
                                                                 spec.shape[0], bits, 32)
    ids = rng.integers(0, arch.n_vocab, 12).tolist()
    ints = Decoder(model, f"int{bits}", slots=3, quantized=blocks, group=32)
    floats = Decoder(dequantized, "fp32") if not arch.tie_weights else None
    got = ints.run([0] * 12, ids, list(range(12)), list(range(12))).copy()
    if floats is not None:  # (a tied head is quantized from wte; the float model keeps wte)
        want = floats.run([0] * 12, ids, list(range(12)), list(range(12)))
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    with pytest.raises(SqlgptError, match="--group-size must be one of"):
        Decoder(model, f"int{bits}", quantized=blocks, group=0)
    # each row as a batch's third sequence gives bit for bit the same logits
    other = rng.integers(0, arch.n_vocab, 12).tolist()
    batch = ints.fork(3)
    rows = batch.run([1] * 12 + [2] * 12, other + ids, list(range(12)) * 2, list(range(24)))
    assert np.array_equal(rows[12:], got)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small character model trained long enough for its weights to
    matter, and the held-out end of the corpus."""
    d = tmp_path_factory.mktemp("quant")
    text = CORPUS.read_text()
    (d / "train.txt").write_text(text[:200_000])
    (d / "held_out.txt").write_text(text[-20_000:])
    result = run("train", d / "train.txt", "--db", d / "model.db", "--preset", "gpt2",
                 "--tokenizer", "char", "--embed-dim", "64", "--heads", "4", "--layers", "2",
                 "--seq-len", "64", "--batch-size", "16", "--lr", "3e-3", "--iters", "150",
                 "--save-every", "150")
    assert result.exit_code == 0, result.output
    return d


def test_quantized_losses_stay_within_the_formats_bounds(trained, tmp_path):
    db = tmp_path / "model.db"
    db.write_bytes((trained / "model.db").read_bytes())
    for bits in (8, 4):
        result = run("quantize", "--db", db, "--bits", bits)
        assert result.exit_code == 0, result.output
        assert f"wrote int{bits} weights (group size 32)" in result.output
    text = (trained / "held_out.txt").read_text()
    loss = {p: sqlgpt.load(db, precision=p).evaluate(text).loss
            for p in ("fp32", "int8", "int4")}
    assert abs(loss["int8"] - loss["fp32"]) < 0.01, loss
    assert abs(loss["int4"] - loss["fp32"]) < 0.05, loss
    assert loss["int4"] != loss["fp32"]  # the integer path did run
    result = run("eval", "--db", db, trained / "held_out.txt", "--precision", "int8", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["loss"] == pytest.approx(loss["int8"], rel=1e-9)
    sizes = dict(sqlite3.connect(db).execute(
        "SELECT bits, sum(length(q) + length(scales)) FROM quantized GROUP BY bits"))
    assert sizes[4] < 0.6 * sizes[8]
    # generation from the CLI, the API and SQL agree on the same seed
    result = run("generate", "--db", db, "--precision", "int8", "--prompt", "ROMEO:",
                 "--max-tokens", "20", "--seed", "5", "--no-stream")
    model = sqlgpt.load(db, precision="int8")
    assert result.stdout.rstrip("\n") == model.generate("ROMEO:", max_tokens=20, seed=5)
    conn = sqlgpt.connect(db, precision="int8")
    assert "ROMEO:" + conn.execute("SELECT sqlgpt_generate('ROMEO:', 20, 1.0, 5)").fetchone()[0] \
        == result.stdout.rstrip("\n")


def test_quantize_refuses_what_it_cannot_do_and_writes_nothing(trained, tmp_path):
    db = tmp_path / "model.db"
    db.write_bytes((trained / "model.db").read_bytes())
    result = run("generate", "--db", db, "--precision", "int8", "--max-tokens", "3")
    assert result.exit_code == 1 and "has no int8 weights: make them with sqlgpt quantize" \
        in result.output
    assert run("quantize", "--db", db, "--bits", "8").exit_code == 0
    before = db.read_bytes()
    again = run("quantize", "--db", db, "--bits", "8")  # nothing to do is success
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert db.read_bytes() == before
    for options, message in ((["--bits", "8", "--group-size", "64"],
                              "already has int8 weights of step 150 with group size 32"),
                             (["--bits", "4", "--group-size", "48"], "--group-size must be one"),
                             (["--bits", "4", "--group-size", "128"], "must be one of")):
        result = run("quantize", "--db", db, *options)
        assert result.exit_code == 1 and message in result.output, result.output
        assert db.read_bytes() == before
    assert run("quantize", "--db", db, "--bits", "3").exit_code == 2
    # training further makes the copy stale: refused until quantized again
    assert run("train", "--db", db, "--resume", "--iters", "155", trained / "train.txt"
               ).exit_code == 0
    result = run("generate", "--db", db, "--precision", "int8", "--max-tokens", "3")
    assert result.exit_code == 1 and "are from step 150, the model is at step 155" in result.output
    assert "int8 copy: group size 32, from step 150 (stale" in run("info", "--db", db).output
    assert run("quantize", "--db", db, "--bits", "8").exit_code == 0
    assert run("generate", "--db", db, "--precision", "int8", "--max-tokens", "3").exit_code == 0
    # a damaged row is a one-line error
    conn = sqlite3.connect(db)
    conn.execute("UPDATE quantized SET q = zeroblob(length(q)) WHERE i = 3 AND "
                 "tensor = 'layers.1.fc2'")
    conn.commit()
    conn.close()
    result = run("eval", "--db", db, trained / "held_out.txt", "--precision", "int8")
    assert result.exit_code == 1 and "layers.1.fc2 are damaged: row 3 fails its checksum" \
        in result.output
    conn = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError):  # the schema allows 32 and 64 only
        conn.execute("UPDATE quantized SET group_size = 48")
    conn.execute("UPDATE quantized SET group_size = 64")  # valid, but not what the rows hold
    conn.commit()
    conn.close()
    result = run("generate", "--db", db, "--precision", "int8", "--max-tokens", "2")
    assert result.exit_code == 1 and "wrong length" in result.output


def test_a_group_size_that_does_not_divide_the_width_is_refused(tmp_path, small_corpus):
    db = tmp_path / "m.db"
    assert run("train", small_corpus, "--db", db, "--embed-dim", "48", "--heads", "4",
               "--layers", "1", "--seq-len", "16", "--batch-size", "4", "--iters", "2",
               "--vocab-size", "50").exit_code == 0
    before = db.read_bytes()
    result = run("quantize", "--db", db, "--bits", "8", "--group-size", "32")
    assert result.exit_code == 1 and "does not divide layers.0.q's input width 48" in result.output
    assert db.read_bytes() == before


def test_the_portable_loop_gives_the_vector_paths_products(rng, tmp_path):
    """quant.c built without any -march (no AVX2: the plain C loops) against
    the installed kernel, on the same quantized values."""
    import shutil
    import subprocess
    from pathlib import Path

    import cffi
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if not csrc.is_dir():
        pytest.skip("the kernel's sources are not beside the tests")
    lib_path = tmp_path / "portable.so"
    subprocess.run([compiler, "-O2", "-std=gnu11", "-fopenmp", "-fPIC", "-shared",
                    str(csrc / "quant.c"), str(csrc / "scratch.c"), "-o", str(lib_path), "-lm"],
                   check=True)
    portable_ffi = cffi.FFI()
    portable_ffi.cdef("int quant_matmul(float *y, const float *x, int n, const void *w, int C, "
                      "int OC, int bits, int G);")
    portable = portable_ffi.dlopen(str(lib_path))
    C, OC, n = 128, 33, 2
    x = rng.standard_normal((n, C)).astype(np.float32)
    for bits in (8, 4):
        for group in (32, 64):
            block = kernel_block(*quantize(rng.standard_normal((C, OC)).astype(np.float32),
                                           bits, group))
            ours, theirs = np.zeros((n, OC), np.float32), np.zeros((n, OC), np.float32)
            lib.quant_matmul(fptr(ours), fptr(x), n, fptr(block), C, OC, bits, group)
            portable.quant_matmul(portable_ffi.from_buffer("float[]", theirs),
                                  portable_ffi.from_buffer("float[]", x), n,
                                  portable_ffi.from_buffer("float[]", block), C, OC, bits, group)
            np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())


TIED = [name for name, (_, options) in ARCHITECTURES.items() if options.get("tie_weights")]


def held_exactly(model, precision):
    """model with wte moved onto values the precision's head holds exactly
    (an import's), and the quantized copy for an integer precision."""
    wte = model.params["wte"].data
    if precision in ("bf16", "f16"):
        if precision == "f16":
            wte[...] = wte.astype(np.float16).astype(np.float32)
        else:  # bfloat16: float32's top 16 bits
            wte.view(np.uint32)[...] &= 0xFFFF0000
        return None
    if precision == "fp32":
        return None
    bits = int(precision[3:])
    blocks = quantized_of(model, bits)
    wte[...] = dequantize(*blocks["head"], model.arch.embed_dim, bits, 32).T
    return blocks


@pytest.mark.parametrize("name", TIED)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "f16", "int8", "int4"])
def test_a_tied_head_that_holds_wte_exactly_is_its_only_copy(rng, name, precision):
    """Where the head holds wte's values exactly (always in float32; an
    import's values in half or integers), the decoder keeps no wte of its
    own and looks tokens up in the head, with bit for bit the logits of a
    decoder that keeps wte; where it does not (a float32 model's wte in
    integers, or in half), wte is kept."""
    arch = arch_of(name, seq_len=16, embed_dim=64, num_heads=4, n_vocab=75)
    model = GPT(arch)
    model.init_weights(rng)
    blocks = held_exactly(model, precision)
    group = 32 if blocks else 0
    decoder = Decoder(model, precision, quantized=blocks, group=group)
    assert decoder.tensors.struct.wte == ffi.NULL
    ids = rng.integers(0, arch.n_vocab, 10).tolist()
    got = decoder.run([0] * 10, ids, list(range(10)), list(range(10))).copy()
    kept = model.params["wte"].data.copy()
    decoder.tensors.struct.wte = ffi.cast("float *", fptr(kept))
    again = decoder.fork(1)
    assert np.array_equal(again.run([0] * 10, ids, list(range(10)), list(range(10))), got)
    if precision != "fp32":  # float32 values the half or integer head does not hold: wte stays
        model.params["wte"].data[...] += 1e-3 * rng.standard_normal(kept.shape).astype(np.float32)
        assert Decoder(model, precision, quantized=blocks, group=group).tensors.struct.wte \
            != ffi.NULL
