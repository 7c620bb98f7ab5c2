"""Passage corpora: JSONL `{"id", "contents"}` (the wiki-18 format) or Parquet with the same columns.

Why a pyarrow table and row numbers: the faiss index stores row positions, so a corpus is addressed by row; a
21M-passage corpus held as Python strings costs several times its size, an Arrow table about its size. Why
shard plans: the index build embeds fixed row ranges (`[start, end)`), so a finished shard has a deterministic
name and a rerun skips it; a plan records where each range starts in the file so a worker can read just it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from raydistill.data.records import DataError

SCHEMA = pa.schema([("id", pa.string()), ("contents", pa.string())])
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


class CorpusError(DataError):
    """A corpus file or line is malformed; the message names the file and line (or row)."""


def title_of(contents: str) -> str:
    """The passage title: the first line of `contents`, surrounding quotes stripped (wiki-18 writes `"Title"`)."""
    return contents.split("\n", 1)[0].strip().strip('"').strip()


def text_of(contents: str) -> str:
    """The passage body: everything after the title line."""
    parts = contents.split("\n", 1)
    return parts[1] if len(parts) > 1 else ""


def corpus_format(path: str | Path) -> str:
    fmt = _SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise CorpusError(f"{path}: unknown corpus format {Path(path).suffix!r}; expected one of {sorted(_SUFFIXES)}")
    return fmt


def parse_line(line: str | bytes, path: str | Path, lineno: int) -> tuple[str, str]:
    """One JSONL line -> (id, contents); ids may be ints (kept as their decimal string)."""
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object with 'id' and 'contents', got {type(obj).__name__}")
    missing = [k for k in ("id", "contents") if k not in obj]
    if missing:
        raise CorpusError(f"{where}: missing key(s) {missing}; have {sorted(obj)}")
    pid, contents = obj["id"], obj["contents"]
    if isinstance(pid, bool) or not isinstance(pid, str | int):
        raise CorpusError(f"{where}: 'id' must be a string or integer, got {type(pid).__name__}")
    if not isinstance(contents, str):
        raise CorpusError(f"{where}: 'contents' must be a string, got {type(contents).__name__}")
    return str(pid), contents


def iter_jsonl(path: str | Path, start_offset: int = 0, start_line: int = 1,
               limit: int | None = None) -> Iterator[tuple[str, str]]:
    """Rows of a JSONL corpus from a byte offset (as recorded in a ShardPlan); blank lines hold no row."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start_offset)
        for lineno, line in enumerate(f, start_line):
            if limit is not None and n >= limit:
                return
            if not line.strip():
                continue
            yield parse_line(line, path, lineno)
            n += 1
    if limit is not None and n < limit:
        raise CorpusError(f"{path}: ended after {n} of {limit} rows from line {start_line}; the file changed "
                          "since it was planned")


def _check_parquet_columns(table_schema: pa.Schema, path: str | Path) -> None:
    missing = [c for c in ("id", "contents") if c not in table_schema.names]
    if missing:
        raise CorpusError(f"{path}: Parquet corpus lacks column(s) {missing}; has {table_schema.names}")


def _normalise_parquet(table: pa.Table, path: str | Path, row_offset: int = 0) -> pa.Table:
    _check_parquet_columns(table.schema, path)
    ids, contents = table.column("id"), table.column("contents")
    if not pa.types.is_string(contents.type) and not pa.types.is_large_string(contents.type):
        raise CorpusError(f"{path}: column 'contents' must be strings, is {contents.type}")
    if pa.types.is_integer(ids.type):
        ids = ids.cast(pa.string())
    elif not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise CorpusError(f"{path}: column 'id' must be strings or integers, is {ids.type}")
    for name, col in (("id", ids), ("contents", contents)):
        if col.null_count:
            first = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
            raise CorpusError(f"{path}: row {row_offset + first}: {name!r} is null")
    return pa.table({"id": ids.cast(pa.string()), "contents": contents.cast(pa.string())})


def read_parquet_rows(path: str | Path, start: int, end: int) -> pa.Table:
    """Rows [start, end) of a Parquet corpus, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    _check_parquet_columns(pf.schema_arrow, path)
    pieces, first_row, row = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > start and row < end:
            if first_row is None:
                first_row = row
            pieces.append(pf.read_row_group(g, columns=["id", "contents"]))
        row += n
    if end > row:
        raise CorpusError(f"{path}: has {row} rows, asked for rows up to {end}; the file changed since planned")
    table = pa.concat_tables(pieces) if pieces else SCHEMA.empty_table()
    table = table.slice(start - (first_row or 0), end - start)
    return _normalise_parquet(table, path, row_offset=start)


class Corpus:
    """Passages addressed by row (the faiss id). Backed by an Arrow table (id, contents)."""

    def __init__(self, table: pa.Table, path: str | Path | None = None):
        self.table = table.combine_chunks() if table.num_rows else table
        self.path = Path(path) if path else None
        self._ids = self.table.column("id")
        self._contents = self.table.column("contents")

    def __len__(self) -> int:
        return self.table.num_rows

    def id(self, row: int) -> str:
        return self._ids[row].as_py()

    def contents(self, row: int) -> str:
        return self._contents[row].as_py()

    def title(self, row: int) -> str:
        return title_of(self.contents(row))

    def rows(self, start: int = 0, end: int | None = None) -> tuple[list[str], list[str]]:
        """(ids, contents) of rows [start, end) as Python lists."""
        t = self.table.slice(start, (end if end is not None else len(self)) - start)
        return t.column("id").to_pylist(), t.column("contents").to_pylist()

    @classmethod
    def from_rows(cls, rows: list[tuple[str, str]] | list[dict], path: str | Path | None = None) -> Corpus:
        if rows and isinstance(rows[0], dict):
            rows = [(str(r["id"]), r["contents"]) for r in rows]  # type: ignore[index]
        ids = [r[0] for r in rows]
        contents = [r[1] for r in rows]
        return cls(pa.table({"id": pa.array(ids, pa.string()), "contents": pa.array(contents, pa.string())}), path)


def read_corpus(path: str | Path) -> Corpus:
    """Load a whole corpus. JSONL takes pyarrow's fast multithreaded reader first; if that fails or sees
    anything off, a line-by-line pass finds the first bad line and names it (never a silent drop)."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: corpus file not found")
    if corpus_format(path) == "parquet":
        import pyarrow.parquet as pq

        return Corpus(_normalise_parquet(pq.read_table(path, columns=None), path), path)
    table = _fast_jsonl(path)
    if table is None:
        rows = list(iter_jsonl(path))
        table = pa.table({"id": pa.array([r[0] for r in rows], pa.string()),
                          "contents": pa.array([r[1] for r in rows], pa.string())})
    return Corpus(table, path)


def _fast_jsonl(path: Path) -> pa.Table | None:
    import pyarrow.json as pj

    try:
        table = pj.read_json(path, parse_options=pj.ParseOptions(explicit_schema=SCHEMA,
                                                                 unexpected_field_behavior="ignore"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    if table.column("id").null_count or table.column("contents").null_count:
        return None
    return table.select(["id", "contents"])


# ------------------------------------------------------------------------------------------ shard plans
@dataclass(frozen=True)
class Shard:
    """Rows [start, end) of the corpus; `offset`/`line` locate `start` in a JSONL file."""

    index: int
    start: int
    end: int
    offset: int = 0
    line: int = 1

    @property
    def name(self) -> str:
        """Deterministic file stem: the row range, so a shard is recognised across runs."""
        return f"emb-{self.start:012d}-{self.end:012d}"

    @property
    def rows(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict:
        return {"index": self.index, "start": self.start, "end": self.end, "offset": self.offset, "line": self.line}


def fingerprint_file(path: str | Path, sample: int = 1 << 20) -> str:
    """Cheap content fingerprint: size + sha256 of the first and last MiB (a 14 GB corpus in milliseconds)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > sample:
            f.seek(max(sample, size - sample))
            h.update(f.read(sample))
    return h.hexdigest()[:16]


def plan_shards(path: str | Path, shard_size: int) -> tuple[int, list[Shard]]:
    """Count the rows and cut them into shards of `shard_size` rows. JSONL: one pass over the file (validating
    nothing but line structure; rows are parsed when embedded). Parquet: from the footer alone."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: corpus file not found")
    if corpus_format(path) == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        _check_parquet_columns(pf.schema_arrow, path)
        n = pf.metadata.num_rows
        return n, [Shard(i, s, min(s + shard_size, n)) for i, s in enumerate(range(0, n, shard_size))]
    shards: list[Shard] = []
    n, offset = 0, 0
    start_offset, start_line = 0, 1
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if n % shard_size == 0:
                    if n:
                        shards.append(Shard(len(shards), n - shard_size, n, start_offset, start_line))
                    start_offset, start_line = offset, lineno
                n += 1
            offset += len(line)
    if n:
        first = (len(shards)) * shard_size
        shards.append(Shard(len(shards), first, n, start_offset, start_line))
    return n, shards


def read_shard(path: str | Path, shard: Shard) -> tuple[list[str], list[str]]:
    """(ids, contents) of one shard, reading only its part of the file."""
    if corpus_format(path) == "parquet":
        t = read_parquet_rows(path, shard.start, shard.end)
        return t.column("id").to_pylist(), t.column("contents").to_pylist()
    ids, contents = [], []
    for pid, text in iter_jsonl(path, shard.offset, shard.line, limit=shard.rows):
        ids.append(pid)
        contents.append(text)
    return ids, contents


def resolve_corpus(spec: str) -> Path:
    """`bundled:<name>` or a path -> an existing file (clear error otherwise)."""
    from raydistill.data import corpus_path

    path = corpus_path(spec)
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise CorpusError(f"corpus {spec!r}: {path} does not exist")
    return path
