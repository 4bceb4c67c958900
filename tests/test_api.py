"""The Python API an app uses: sqlgpt.load(...)."""
import numpy as np
import pytest

import sqlgpt
from sqlgpt.errors import SqlgptError


def test_config_and_state_dict(trained_db):
    m = sqlgpt.load(trained_db)
    cfg = m.config
    assert cfg["embed_dim"] == 32 and cfg["num_layers"] == 2 and cfg["preset"] == "lua"
    sd = m.state_dict()
    C, V = 32, cfg["vocab_size"] + 2
    expected = {"wte": (V, C), "wpe": (16, C), "head": (C, V)}
    for layer in range(2):
        expected.update({f"layers.{layer}.{c}": s for c, s in
                         (("q", (C, C)), ("k", (C, C)), ("v", (C, C)), ("proj", (C, C)),
                          ("fc1", (C, 4 * C)), ("fc2", (4 * C, C)))})
    assert {k: v.shape for k, v in sd.items()} == expected
    assert all(v.dtype == np.float32 for v in sd.values())
    assert m.num_parameters() == sum(v.size for v in sd.values())


def test_encode_decode_and_logits(trained_db):
    m = sqlgpt.load(trained_db)
    ids = m.encode("The king, the KING!")
    assert len(ids) == 4 and ids[0] == ids[2]
    assert m.decode(ids).startswith("the")
    logits = m.logits(ids)
    assert logits.shape == (4, m.config["vocab_size"] + 2)
    # causal: a prefix's logits do not depend on what follows
    np.testing.assert_allclose(m.logits(ids[:2]), logits[:2], rtol=1e-5, atol=1e-6)


def test_generate_is_reproducible_with_a_seed(trained_db):
    m = sqlgpt.load(trained_db)
    a = m.generate("the citizen", max_tokens=12, temperature=0.9, top_k=20, seed=3)
    b = m.generate("the citizen", max_tokens=12, temperature=0.9, top_k=20, seed=3)
    assert a == b and a.startswith("the citizen") and len(a.split()) == 14
    assert "<unk>" not in a and "<pad>" not in a
    greedy = m.generate("the citizen", max_tokens=5, temperature=0)
    assert greedy == m.generate("the citizen", max_tokens=5, temperature=0, seed=99)


def test_bf16_generation_is_reproducible_and_its_precision_is_checked(trained_db):
    m = sqlgpt.load(trained_db, precision="bf16")
    assert m.precision == "bf16"
    a = m.generate("the citizen", max_tokens=12, temperature=0.9, seed=3)
    assert a == m.generate("the citizen", max_tokens=12, temperature=0.9, seed=3)
    assert len(a.split()) == 14
    with pytest.raises(SqlgptError, match="precision"):
        sqlgpt.load(trained_db, precision="fp16")
    with pytest.raises(SqlgptError, match="has no int4 weights: make them with sqlgpt quantize"):
        sqlgpt.load(trained_db, precision="int4")


def test_generation_runs_past_the_context_length(trained_db):
    m = sqlgpt.load(trained_db)
    text = m.generate("the", max_tokens=40, seed=1)  # seq_len is 16
    assert len(text.split()) == 41


def test_prompt_of_unknown_words_is_an_error(trained_db):
    m = sqlgpt.load(trained_db)
    with pytest.raises(SqlgptError, match="vocabulary"):
        m.generate("zzyzx qwfp", max_tokens=3)
    with pytest.raises(SqlgptError, match="no words"):
        m.generate("!!! ...", max_tokens=3)


def test_top_p_and_top_k_restrict_the_choice():
    from sqlgpt.inference.sampling import Rng, sample
    rng = Rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert {sample(logits, rng, top_k=1) for _ in range(50)} == {0}
    assert {sample(logits, rng, top_p=0.7) for _ in range(200)} == {0, 1}
    assert {sample(logits, rng, banned=(0,), temperature=0)} == {1}


def test_edge_cases_are_clean_errors_or_work(trained_db):
    m = sqlgpt.load(trained_db)
    with pytest.raises(SqlgptError, match="out of range"):
        m.decode([10**6])
    with pytest.raises(SqlgptError, match="out of range"):
        m.decode([-1])
    with pytest.raises(SqlgptError, match="seed"):
        m.generate("the", max_tokens=2, seed=-1)
    assert len(m.generate("the", max_tokens=3, temperature=1e-300, seed=1).split()) == 4


def test_generation_with_a_one_token_context(tmp_path, small_corpus):
    from click.testing import CliRunner
    from sqlgpt.cli import main
    db = tmp_path / "m.db"
    result = CliRunner().invoke(main, ["train", str(small_corpus), "--db", str(db), "--iters", "2",
                                       "--seq-len", "1", "--embed-dim", "8", "--heads", "2",
                                       "--layers", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert len(sqlgpt.load(db).generate("the", max_tokens=5, seed=0).split()) == 6


def test_importing_a_source_folder_without_the_kernel_says_what_to_do(tmp_path):
    """A checkout's sqlgpt/ (no built kernel) shadows the installed package
    when Python runs in the checkout: a one-line ImportError says so."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    source = Path(sqlgpt.__file__).parent
    copy = tmp_path / "sqlgpt"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("_kernel*", "__pycache__"))
    script = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
              "if 'editable' not in repr(f).lower()]; import sqlgpt")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "C kernel is not built" in last and "pip install -e ." in last
