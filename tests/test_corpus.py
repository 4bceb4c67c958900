"""Corpus input (files, directories, standard input, encodings) and the
token file training reads: tokenized once, named and verified by the
database, refused when missing or changed."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import sqlgpt
from sqlgpt.data import corpus as corpus_module
from sqlgpt.cli import main
from sqlgpt.data.corpus import WHITESPACE, find_sources, last_boundary, read_chunks
from sqlgpt.data.dataset import tokens_path
from sqlgpt.errors import SqlgptError

from conftest import TINY

CHAR = ["--tokenizer", "char"]


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
               max_size=300),
       st.integers(min_value=1, max_value=40))
@settings(max_examples=200, deadline=None)
def test_chunks_join_to_the_text_and_end_at_boundaries(tmp_path_factory, text, block):
    path = tmp_path_factory.mktemp("c") / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    old = corpus_module.CHUNK_BYTES
    corpus_module.CHUNK_BYTES = block  # tiny blocks: characters and boundaries cut everywhere
    try:
        chunks = list(read_chunks(find_sources([path])[0]))
    finally:
        corpus_module.CHUNK_BYTES = old
    assert "".join(chunks) == text
    for chunk, following in zip(chunks, chunks[1:]):
        assert chunk.endswith("\n") and following[0] not in WHITESPACE


def test_last_boundary():
    assert last_boundary("a\nb\n c") == 2
    assert last_boundary("a\n\n") == 0 and last_boundary("abc") == 0
    assert last_boundary("x\n\ny") == 3


def test_directories_are_read_recursively_with_extensions_in_order(tmp_path, small_corpus):
    text = small_corpus.read_text()
    write(tmp_path / "books" / "b.txt", text[10000:])
    write(tmp_path / "books" / "a" / "a.txt", text[:10000])
    write(tmp_path / "books" / "notes.md", "# a markdown note about the king\n" * 50)
    write(tmp_path / "books" / ".hidden" / "x.txt", "hidden")
    names = [s.path.name for s in find_sources([tmp_path / "books"], [".txt"])]
    assert names == ["a.txt", "b.txt"]
    assert len(find_sources([tmp_path / "books"], ["txt", ".md"])) == 3
    with pytest.raises(SqlgptError, match="no files with suffix .rst"):
        find_sources([tmp_path / "books"], [".rst"])
    db = tmp_path / "m.db"
    result = run("train", tmp_path / "books", "--db", db, "--ext", ".txt", "--iters", 2,
                 *TINY, *CHAR)
    assert result.exit_code == 0, result.output
    tokens = np.fromfile(tokens_path(db), "<u2")
    model = sqlgpt.load(db)
    eos = model.tokenizer.eos_id
    assert (tokens == eos).sum() == 1  # two documents, one separator
    assert model.decode(tokens) == text  # <eos> decodes to nothing


def test_several_files_and_stdin(tmp_path, small_corpus):
    text = small_corpus.read_text()
    first, second = write(tmp_path / "1.txt", text[:12000]), write(tmp_path / "2.txt", text[12000:])
    db = tmp_path / "files.db"
    assert run("train", first, second, "--db", db, "--iters", 1, *TINY, *CHAR).exit_code == 0
    piped = tmp_path / "piped.db"
    result = run("train", "-", "--db", piped, "--iters", 1, *TINY, *CHAR, input=text)
    assert result.exit_code == 0, result.output
    assert list(tmp_path.glob("sqlgpt-stdin-*")) == []  # the spooled copy is gone
    assert sqlgpt.load(piped).decode(np.fromfile(tokens_path(piped), "<u2")) == text


@pytest.mark.parametrize("mode", ["strict", "replace"])
def test_bytes_that_are_not_utf8(tmp_path, small_corpus, mode):
    bad = tmp_path / "bad.txt"
    good = small_corpus.read_bytes()
    bad.write_bytes(good[:5000] + b"\xff\xfe" + good[5000:])
    db = tmp_path / "m.db"
    result = run("train", bad, "--db", db, "--iters", 1, *TINY, *CHAR,
                 "--encoding-errors", mode)
    if mode == "strict":
        assert result.exit_code != 0 and "bad.txt" in result.output
        assert "offset 5000" in result.output and "--encoding-errors replace" in result.output
        assert not db.exists() and not tokens_path(db).exists()
    else:
        assert result.exit_code == 0, result.output
        assert "\ufffd" in sqlgpt.load(db).tokenizer.decode(np.fromfile(tokens_path(db), "<u2"))


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "word"])
@pytest.mark.parametrize("content", [b"", b" \n\t \r\n", b"abc\x00def" * 100])
def test_empty_whitespace_and_binary_corpora_are_one_line_errors(tmp_path, kind, content):
    path = tmp_path / "c.txt"
    path.write_bytes(content)
    db = tmp_path / "m.db"
    result = run("train", path, "--db", db, "--iters", 1, *TINY, "--tokenizer", kind)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not db.exists() and not list(tmp_path.glob("*.tokens*"))


def trained(tmp_path, small_corpus, *extra):
    db = tmp_path / "m.db"
    result = run("train", small_corpus, "--db", db, "--iters", 2, "--save-every", 1, *TINY,
                 *extra)
    assert result.exit_code == 0, result.output
    return db


def test_resume_reads_the_token_file_without_the_corpus(tmp_path, small_corpus):
    db = trained(tmp_path, small_corpus, *CHAR)
    info = json.loads(dict(__import__("sqlite3").connect(db).execute(
        "SELECT key, value FROM train_state"))["tokens"])
    assert info["file"] == "m.db.tokens" and info["count"] == tokens_path(db).stat().st_size // 2
    result = run("train", "--db", db, "--iters", 4, "--resume")
    assert result.exit_code == 0, result.output
    assert sqlgpt.load(db).step == 4


def test_resume_refuses_a_changed_or_missing_token_file(tmp_path, small_corpus):
    db = trained(tmp_path, small_corpus, *CHAR)
    path = tokens_path(db)
    original = path.read_bytes()
    changed = bytearray(original)
    changed[100] ^= 1
    path.write_bytes(bytes(changed))
    result = run("train", "--db", db, "--iters", 3, "--resume")
    assert result.exit_code != 0 and "has changed" in result.output
    path.unlink()
    result = run("train", "--db", db, "--iters", 3, "--resume")
    assert result.exit_code != 0 and "missing" in result.output
    # with the corpus named, the file is tokenized again, to the recorded ids
    result = run("train", small_corpus, "--db", db, "--iters", 3, "--resume")
    assert result.exit_code == 0, result.output
    assert path.read_bytes() == original
    other = write(tmp_path / "other.txt", small_corpus.read_text()[::-1])
    result = run("train", other, "--db", db, "--iters", 4, "--resume")
    assert result.exit_code != 0 and "not the corpus" in result.output


def test_a_moved_database_resumes_with_its_corpus(tmp_path, small_corpus):
    db = trained(tmp_path, small_corpus)
    moved = tmp_path / "elsewhere" / "m.db"
    moved.parent.mkdir()
    shutil.copy(db, moved)
    assert run("train", "--db", moved, "--iters", 3, "--resume").exit_code != 0
    assert run("train", small_corpus, "--db", moved, "--iters", 3, "--resume").exit_code == 0
    assert tokens_path(moved).read_bytes() == tokens_path(db).read_bytes()


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_generation_decodes_pieces_as_they_came(tmp_path, small_corpus, kind):
    extra = ["--vocab-size", "300"] if kind == "bpe" else []
    db = trained(tmp_path, small_corpus, "--tokenizer", kind, *extra)
    model = sqlgpt.load(db)
    text = "First Citizen:\nBefore we proceed"
    assert model.decode(model.encode(text)) == text
    out = run("generate", "--db", db, "--prompt", "First Citizen:", "--max-tokens", 20,
              "--seed", 3)
    assert out.exit_code == 0 and out.output.startswith("First Citizen:"), out.output
    pieces = list(model.stream("First Citizen:", max_tokens=20, seed=3))
    assert "".join(pieces) + "\n" == out.output
    tok = json.loads(run("tokenize", "--db", db, text, "--json").output)
    assert tok["tokens"] == len(tok["ids"]) == len(tok["pieces"])
    assert kind != "char" or tok["tokens"] == len(text)
    plain = run("tokenize", "--db", db, text).output
    assert f"{len(tok['ids'])} tokens" in plain


def test_version1_database_resumes_into_a_token_file(tmp_path, small_corpus):
    import gzip
    from conftest import ROOT
    db = tmp_path / "v1.db"
    db.write_bytes(gzip.decompress((ROOT / "tests" / "data" / "v1_model.db.gz").read_bytes()))
    assert run("train", "--db", db, "--iters", 22, "--resume").exit_code != 0  # needs the corpus
    result = run("train", small_corpus, "--db", db, "--iters", 22, "--resume")
    assert result.exit_code == 0, result.output
    assert tokens_path(db).exists()
    assert run("train", "--db", db, "--iters", 24, "--resume").exit_code == 0


def test_a_progress_bar_on_a_terminal(tmp_path, small_corpus):
    """The tokenizing passes draw bars on a terminal (a pty here)."""
    import pty
    import os
    db = tmp_path / "m.db"
    script = ("import sys; from sqlgpt.cli import main; "
              f"sys.argv = ['sqlgpt', 'train', {str(small_corpus)!r}, '--db', {str(db)!r}, "
              f"'--iters', '1', *{TINY!r}, '--tokenizer', 'char']; main()")
    leader, follower = pty.openpty()
    proc = subprocess.run([sys.executable, "-c", script], stderr=follower, stdout=follower,
                          cwd=tmp_path, timeout=120)
    os.close(follower)
    output = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        output += data
    os.close(leader)
    assert proc.returncode == 0, output
    assert b"reading" in output and b"tokenizing" in output


def test_a_binary_file_in_a_corpus_folder_gets_the_ext_hint(tmp_path, small_corpus):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text(small_corpus.read_text())
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 50)
    result = run("train", folder, "--db", tmp_path / "m.db", "--iters", 1, *TINY)
    assert result.exit_code == 1 and "logo.png looks binary" in result.output
    assert "--ext" in result.output and len(result.output.strip().splitlines()) == 1
    result = run("train", folder, "--db", tmp_path / "m.db", "--iters", 1, *TINY, "--ext", ".txt")
    assert result.exit_code == 0, result.output
