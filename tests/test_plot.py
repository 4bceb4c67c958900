"""sqlgpt plot and sqlgpt attention: real PNG files of the expected size,
drawn from the right numbers."""
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt.cli import main
from sqlgpt.interop.plot import attention_maps, curves

from conftest import TINY


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def png_size(path):
    """(width, height) from a PNG's header, after checking it is one."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def llama_db(tmp_path_factory, small_corpus):
    db = tmp_path_factory.mktemp("plot") / "m.db"
    result = run("train", small_corpus, "--db", db, "--iters", 20, "--save-every", 5, *TINY,
                 "--preset", "llama", "--kv-heads", 2, "--tokenizer", "char", "--vocab-size", 0,
                 "--eval-iters", 1)
    assert result.exit_code == 0, result.output
    return db


def test_the_curves_come_from_the_tables(llama_db):
    series = curves(llama_db)
    assert series["train loss"][0] == tuple(range(1, 21))
    assert series["validation loss"][0] == (5, 10, 15, 20)
    assert len(series["gradient norm"][1]) == 20 and all(v > 0 for v in series["gradient norm"][1])


def test_plot_writes_a_png(llama_db, tmp_path):
    out = tmp_path / "curves.png"
    result = run("plot", "--db", llama_db, "-o", out)
    assert result.exit_code == 0, result.output
    assert png_size(out) == (640, 640)  # 8 x 8 inches at 80 dpi


def test_attention_maps_are_the_kernels_attention(llama_db):
    """Each map row is a causal probability distribution, and the maps times
    the values give back the attention output the kernel computed."""
    model = sqlgpt.load(llama_db)
    pieces, maps = attention_maps(model, "the king is")
    T, arch = len(pieces), model.arch
    assert maps.shape == (arch.num_layers, arch.num_heads, T, T)
    assert np.allclose(maps.sum(-1), 1) and np.all(np.triu(maps, 1) == 0)
    hs, H, KV = arch.head_dim, arch.num_heads, arch.n_kv_heads
    for layer, acts in enumerate(model._gpt.acts.layers):
        v = acts["v"][:T].reshape(T, KV, hs)
        out = acts["att"][:T].reshape(T, H, hs)
        for h in range(H):
            np.testing.assert_allclose(maps[layer, h] @ v[:, h // (H // KV)], out[:, h],
                                       rtol=1e-4, atol=1e-5)


def test_attention_writes_a_png(llama_db, tmp_path):
    out = tmp_path / "attn.png"
    result = run("attention", "--db", llama_db, "--prompt", "the king", "-o", out)
    assert result.exit_code == 0, result.output
    width, height = png_size(out)
    # 4 heads x 2 layers of panels 0.25 inch per token (8 here) wide, at 80 dpi
    assert (width, height) == (4 * 160, 2 * 160)


@pytest.mark.parametrize("args, message", [
    (["plot", "-o", "curves.txt"], "must end in .png"),
    (["plot", "-o", "no/such/dir/c.png"], "existing directory"),
    (["attention", "--prompt", "日本", "-o", "a.png"], "none of the prompt's tokens"),
])
def test_bad_picture_requests_are_one_line_errors(llama_db, tmp_path, monkeypatch, args,
                                                   message):
    monkeypatch.chdir(tmp_path)
    result = run(args[0], "--db", llama_db, *args[1:])
    assert result.exit_code == 1 and message in result.output


def test_without_matplotlib_says_what_to_install(llama_db, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run("plot", "--db", llama_db, "-o", tmp_path / "c.png")
    assert result.exit_code == 1 and 'pip install "sqlgpt[plot]"' in result.output
