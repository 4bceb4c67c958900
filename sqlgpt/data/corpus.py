"""Corpus input: files, folders and standard input, read as UTF-8 text in
chunks, so that a corpus far larger than memory streams through the
tokenizer with flat memory.

Every file is one document; so is every row of a SQL query's results
(SqlSource: `--sql QUERY --from app.db`, read by sqlgpt.store.app_rows
through a read-only connection, each row's first column as the text). A chunk ends right after
a "\\n" that is
followed by a character other than whitespace (or at the end of its
document): every tokenizer splits there anyway, so encoding chunk by chunk
gives exactly the ids of encoding the whole text.
"""
import codecs
import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SqlgptError

CHUNK_BYTES = 1 << 20   # what one read takes in; a chunk is about this long
WHITESPACE = " \t\n\v\f\r"
ENCODING_ERRORS = ("strict", "replace")


@dataclass(frozen=True)
class Source:
    """One document of the corpus: a file, or standard input spooled to one."""
    path: Path
    name: str       # as the user named it ("-" for standard input)
    size: int       # bytes
    folder: str = ""  # the directory it was found in, when one was named

    def skip_hint(self):
        """For a file that is not text: how to leave it out."""
        return (f"; to read only {self.folder}'s text files, name their suffix with --ext "
                f"(e.g. --ext .txt)" if self.folder else "")


@dataclass(frozen=True)
class SqlSource(Source):
    """A query's rows, each a document: path is the database it reads, and
    reader(path, query) yields each row's text (sqlgpt.store.app_rows:
    every SQL statement lives in the store)."""
    query: str = ""
    reader: object = None

    def __str__(self):  # as messages name it
        return f"the rows of --sql {self.query!r}"

    def rows(self):
        return self.reader(self.path, self.query)


def documents(sources, errors="strict", on_bytes=None):
    """Yield each document of the sources, in order, as an iterator of its
    chunks: a file's (read_chunks), or a query row's text as one chunk."""
    for source in sources:
        if isinstance(source, SqlSource):
            for text in source.rows():
                yield iter((text,))
        else:
            yield read_chunks(source, errors)
        if on_bytes:
            on_bytes(source.size)


def find_sources(paths, extensions=(), spool_dir=None):
    """The corpus's files, in order: each path a file, "-" (standard input,
    copied to a file in spool_dir so it can be read twice), or a directory
    (every file below it whose suffix is in extensions, or every file
    without extensions, sorted). A one-line error for a missing path or an
    empty selection."""
    if not paths:
        raise SqlgptError("no corpus given: name one or more files, a directory, or - for stdin")
    extensions = {e if e.startswith(".") else f".{e}" for e in extensions}
    sources = []
    for given in paths:
        if isinstance(given, Source):  # made already (sql_sources)
            sources.append(given)
            continue
        if str(given) == "-":
            sources.append(_spool_stdin(spool_dir))
            continue
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and (not extensions or p.suffix in extensions)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                wanted = f" with suffix {', '.join(sorted(extensions))}" if extensions else ""
                raise SqlgptError(f"corpus directory {path} has no files{wanted}")
            sources += [Source(p, str(p), p.stat().st_size, str(path)) for p in found]
        elif path.is_file():
            sources.append(Source(path, str(path), path.stat().st_size))
        elif path.exists():
            raise SqlgptError(f"corpus {path} is not a file")
        else:
            raise SqlgptError(f"corpus {path} does not exist")
    return sources


def _spool_stdin(spool_dir):
    """Standard input copied to a temporary file (read in blocks)."""
    spool = tempfile.NamedTemporaryFile(prefix="sqlgpt-stdin-", dir=spool_dir, delete=False)
    with spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, CHUNK_BYTES)
    path = Path(spool.name)
    return Source(path, "-", path.stat().st_size)


def read_chunks(source, errors="strict"):
    """Yield the text of one document in chunks at the boundaries above. A
    NUL byte (a binary file) and, with errors "strict", bytes that are not
    UTF-8 are one-line errors naming the file and the byte offset. Text
    without a boundary (one long line, or only indented lines) is held until
    one comes: memory follows the longest such stretch, not the file."""
    if errors not in ENCODING_ERRORS:
        raise SqlgptError(f"encoding errors must be strict or replace, not {errors!r}")
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset, held = 0, []  # text read since the last boundary, in pieces (no re-copying)
    try:
        with open(source.path, "rb") as f:
            while True:
                block = f.read(CHUNK_BYTES)
                nul = block.find(b"\x00")
                if nul >= 0:
                    raise SqlgptError(f"corpus {source.name} looks binary (a NUL byte at offset "
                                      f"{offset + nul}); give UTF-8 text files"
                                      f"{source.skip_hint()}")
                # the decoder sees the bytes it buffered (a character cut by
                # the last block) and then this block
                start = offset - len(decoder.getstate()[0])
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise SqlgptError(f"corpus {source.name} is not UTF-8 text (bad byte at "
                                      f"offset {start + e.start}); use --encoding-errors "
                                      f"replace to read it anyway{source.skip_hint()}") from None
                offset += len(block)
                if not block:
                    rest = "".join(held) + text
                    if rest:
                        yield rest
                    return
                # a boundary may straddle the pieces: look from the last held character
                tail = held[-1][-1] if held and held[-1] else ""
                cut = last_boundary(tail + text) - len(tail)
                if cut > 0:
                    yield "".join(held) + text[:cut]
                    held = [text[cut:]]
                elif cut == 0 and tail:  # the boundary is right between the pieces
                    yield "".join(held)
                    held = [text]
                else:
                    held.append(text)
    except OSError as e:
        raise SqlgptError(f"cannot read corpus {source.name}: {e.strerror}") from None


def last_boundary(text):
    """The end of the longest prefix of text that ends right after a "\\n"
    followed by a character that is not whitespace (0 if there is none)."""
    at = len(text) - 1
    while True:
        at = text.rfind("\n", 0, at)
        if at < 0:
            return 0
        if at + 1 < len(text) and text[at + 1] not in WHITESPACE:
            return at + 1


def corpus_chunks(sources, errors="strict", on_bytes=None):
    """(document index, chunk) over every document in order; on_bytes(n) is
    called as each source's bytes are read through (for a progress bar)."""
    for index, document in enumerate(documents(sources, errors, on_bytes)):
        for chunk in document:
            yield index, chunk


def fingerprint(sources):
    """SHA-256 over the sources' bytes, in order (one file: the file's own
    SHA-256, as schema-1 databases stored it); a query's rows count as each
    row's UTF-8 length (8 bytes) and bytes, so a changed row changes it."""
    digest = hashlib.sha256()
    for source in sources:
        if isinstance(source, SqlSource):
            for text in source.rows():
                data = text.encode("utf-8", "surrogatepass")
                digest.update(len(data).to_bytes(8, "little") + data)
            continue
        with open(source.path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                digest.update(block)
    return digest.hexdigest()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_spools(sources):
    """Delete the temporary copies of standard input."""
    for source in sources:
        if source.name == "-":
            try:
                os.unlink(source.path)
            except OSError:
                pass
