"""Read question sets (paper JSON, JSONL, Parquet, local HF `datasets` dirs) into Records."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.data.records import DataError, Domain, Record

PACKAGE_DATA = Path(__file__).parent
BENCHMARK_DIR = PACKAGE_DATA / "benchmarks"
CORPUS_DIR = PACKAGE_DATA / "corpus"

_DATE_SUFFIX = re.compile(r"_\d{8}$")
_MATH_SETS = ("math", "aime", "olymath", "gsm")


def set_name(path: str | Path) -> str:
    """`math_500_20250414.json` -> `math_500` (the file stem without its date)."""
    return _DATE_SUFFIX.sub("", Path(path).stem)


def infer_domain(name: str) -> Domain:
    return "math" if name.lower().startswith(_MATH_SETS) else "qa"


@dataclass
class LoadResult:
    name: str
    path: Path
    records: list[Record]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """(row index, reason) of every row left out."""


def _gold(value: object) -> str | list[str] | None:
    """Normalise a gold answer; floats holding integers (GSM-Hard) become integer strings."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (list, tuple)):
        items = [g for g in (_gold(v) for v in value) if isinstance(g, str)]
        return items or None
    return None


def _rows_from_file(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _rows_from_hf_dir(path)
    elif suffix == ".json":
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from e
        rows = doc.get("examples") if isinstance(doc, dict) else doc
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected {{'examples': [...]}} or a JSON list")
        yield from rows
    elif suffix in (".jsonl", ".ndjson"):
        with path.open() as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    yield {"__error__": f"line {i + 1} is not valid JSON: {e.msg}"}
    elif suffix == ".parquet":
        yield from pq.read_table(path).to_pylist()
    else:
        raise DataError(f"{path}: unsupported format (use .json, .jsonl, .parquet or a datasets dir)")


def _rows_from_hf_dir(path: Path) -> Iterator[dict]:
    """A `datasets.Dataset.save_to_disk` dir: Arrow stream files listed in state.json."""
    state = path / "state.json"
    if not state.exists():
        raise DataError(f"{path}: not a saved Hugging Face dataset (no state.json)")
    files = [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    for f in files:
        with pa.memory_map(str(f)) as src:
            yield from pa.ipc.open_stream(src).read_all().to_pylist()


def load_file(path: str | Path, *, name: str | None = None, domain: Domain | None = None,
              strict: bool = False, limit: int | None = None) -> LoadResult:
    """Load one file. Bad rows are skipped and counted, or raise DataError (naming file and row) when strict."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    name = name or set_name(path)
    domain = domain or infer_domain(name)
    result = LoadResult(name=name, path=path, records=[])
    for i, row in enumerate(_rows_from_file(path)):
        if limit is not None and len(result.records) >= limit:
            break
        reason = _check_row(row)
        if reason is None:
            gold = _gold(row.get("answer", row.get("golden_answers")))
            reason = None if gold is not None else "missing or empty answer"
        if reason is not None:
            if strict:
                raise DataError(f"{path}: row {i}: {reason}")
            result.skipped.append((i, reason))
            continue
        oid = row.get("id", i)
        result.records.append(Record(id=f"{name}/{oid}", question=row["question"].strip(), answer=gold,
                                     domain=domain, source=name))
    ids = [r.id for r in result.records]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise DataError(f"{path}: duplicate id {dup!r}")
    return result


def _check_row(row: object) -> str | None:
    if not isinstance(row, dict):
        return f"row is {type(row).__name__}, not an object"
    if "__error__" in row:
        return row["__error__"]
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        return "missing or empty question"
    return None


def bundled_sets() -> dict[str, Path]:
    """name -> path of every bundled benchmark file (train and test)."""
    return {set_name(p): p for p in sorted(BENCHMARK_DIR.glob("*/*.json"))}


def bundled_split(name: str) -> str:
    return bundled_sets()[name].parent.name


def resolve_set(name_or_path: str) -> Path:
    sets = bundled_sets()
    if name_or_path in sets:
        return sets[name_or_path]
    p = Path(name_or_path)
    if p.exists():
        return p
    raise DataError(f"unknown data set {name_or_path!r}: not a file and not one of {', '.join(sorted(sets))}")


def load_set(name_or_path: str, *, strict: bool = False, limit: int | None = None) -> LoadResult:
    return load_file(resolve_set(name_or_path), strict=strict, limit=limit)


def load_sets(names: Iterable[str], *, strict: bool = False, limit: int | None = None) -> list[Record]:
    """Records of several sets, in order; `limit` applies per set."""
    out: list[Record] = []
    for n in names:
        out.extend(load_set(n, strict=strict, limit=limit).records)
    return out


def corpus_path(spec: str) -> Path:
    """`bundled:<name>` -> packaged corpus file; anything else is a path."""
    if spec.startswith("bundled:"):
        stem = spec.split(":", 1)[1]
        matches = sorted(CORPUS_DIR.glob(f"{stem}.*"))
        if not matches:
            raise DataError(f"no bundled corpus {stem!r}; have {[p.stem for p in CORPUS_DIR.iterdir()]}")
        return matches[0]
    return Path(spec)
