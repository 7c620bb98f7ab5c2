"""Reading SFT Parquet (architecture.md "SFT data") and checking it against the student's tokenizer.

Token ids are only meaningful for the tokenizer that produced them, so training refuses data whose
`meta.json` vocab size or chat-template hash differs from the model's tokenizer instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raydistill.data.records import DataError

COLUMNS = ("id", "sample", "kind", "input_ids", "loss_mask", "num_tokens", "num_loss_tokens")
TRAIN_COLUMNS = ("id", "sample", "input_ids", "loss_mask", "num_tokens", "num_loss_tokens")
META_KEYS = ("tokenizer", "vocab_size", "chat_template_sha256", "max_length", "count")


class SftDataError(DataError):
    """The SFT dataset is missing, empty, malformed, or made with another tokenizer."""


class ChatTemplateError(SftDataError):
    """The student's tokenizer has no chat template, so its chats cannot match the SFT data."""


@dataclass(frozen=True)
class SftMeta:
    tokenizer: str
    vocab_size: int
    chat_template_sha256: str
    max_length: int
    count: int

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> SftMeta:
        missing = [k for k in META_KEYS if k not in d]
        if missing:
            raise SftDataError(f"{source}: meta.json lacks {', '.join(missing)} (expected keys: {', '.join(META_KEYS)})")
        return cls(tokenizer=str(d["tokenizer"]), vocab_size=int(d["vocab_size"]),
                   chat_template_sha256=str(d["chat_template_sha256"]), max_length=int(d["max_length"]),
                   count=int(d["count"]))


def chat_template_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's chat template text (the value `meta.json` records)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: hash them in a stable order
        template = json.dumps(template, sort_keys=True)
    if not template:
        name = getattr(tokenizer, "name_or_path", "?")
        raise ChatTemplateError(f"tokenizer {name!r} has no chat template; the student needs one (its chats are "
                                f"what the SFT data holds) - use an -Instruct checkpoint or set one")
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def parquet_files(data_dir: str | Path) -> list[Path]:
    d = Path(data_dir)
    return sorted(p for p in d.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in
                                                               p.relative_to(d).parts))


def check_dataset_dir(data_dir: str | Path, made_by: str = "generate") -> SftMeta:
    """The directory exists, has meta.json and at least one Parquet file with rows; returns the meta."""
    d = Path(data_dir)
    if not d.is_dir():
        raise SftDataError(f"SFT dataset {d} does not exist; it is made by the `{made_by}` stage "
                           f"(`raydistill {made_by} --config ...`), or point train.data at an SFT dataset dir")
    meta_path = d / "meta.json"
    if not meta_path.exists():
        raise SftDataError(f"SFT dataset {d} has no meta.json (is the `{made_by}` stage finished?)")
    try:
        meta = SftMeta.from_dict(json.loads(meta_path.read_text()), str(meta_path))
    except json.JSONDecodeError as e:
        raise SftDataError(f"{meta_path}: not valid JSON: {e}") from e
    files = parquet_files(d)
    if not files or meta.count <= 0:
        raise SftDataError(f"SFT dataset {d} is empty ({len(files)} Parquet files, meta count {meta.count}); "
                           f"nothing to train on - check the `{made_by}` stage's filter report")
    import pyarrow.parquet as pq

    schema = pq.read_schema(files[0])
    missing = [c for c in TRAIN_COLUMNS if c not in schema.names]
    if missing:
        raise SftDataError(f"{files[0]}: missing columns {missing}; SFT data needs {list(COLUMNS)}")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if rows == 0:
        raise SftDataError(f"SFT dataset {d} is empty: {len(files)} Parquet files with 0 rows")
    if rows != meta.count:
        raise SftDataError(f"SFT dataset {d}: meta.json count {meta.count} but the Parquet files hold {rows} rows")
    return meta


def check_tokenizer(meta: SftMeta, tokenizer, data_dir: str | Path = "") -> None:
    """Refuse a tokenizer whose vocab or chat template differs from the one that made the data."""
    vocab = len(tokenizer)
    name = getattr(tokenizer, "name_or_path", "?")
    if vocab != meta.vocab_size:
        raise SftDataError(f"tokenizer mismatch: the student's tokenizer {name!r} has {vocab} tokens but the SFT "
                           f"data {data_dir} was made with {meta.tokenizer!r} ({meta.vocab_size} tokens); "
                           f"rebuild the SFT data with the student's tokenizer or train that student")
    sha = chat_template_sha256(tokenizer)
    if sha != meta.chat_template_sha256:
        raise SftDataError(f"chat template mismatch: the student's tokenizer {name!r} template sha256 {sha[:12]}... "
                           f"differs from the SFT data's ({meta.chat_template_sha256[:12]}..., made with "
                           f"{meta.tokenizer!r}) in {data_dir}; rebuild the SFT data for this student")


def check_model_vocab(model_vocab_size: int, meta: SftMeta, model_name: str) -> None:
    """The model's embedding must cover every id the tokenizer can produce."""
    if model_vocab_size < meta.vocab_size:
        raise SftDataError(f"model {model_name!r} has {model_vocab_size} embeddings, fewer than the SFT data's "
                           f"tokenizer ({meta.vocab_size} tokens)")


def validate_row(row: dict[str, Any], vocab_size: int | None = None) -> None:
    """One row is self-consistent; errors name the row."""
    ids, mask = row["input_ids"], row["loss_mask"]
    where = f"SFT row id={row.get('id')!r} sample={row.get('sample')!r}"
    if len(ids) == 0:
        raise SftDataError(f"{where}: empty input_ids")
    if len(ids) != len(mask):
        raise SftDataError(f"{where}: {len(ids)} input_ids but {len(mask)} loss_mask entries")
    if "num_tokens" in row and int(row["num_tokens"]) != len(ids):
        raise SftDataError(f"{where}: num_tokens {row['num_tokens']} != len(input_ids) {len(ids)}")
    if vocab_size is not None:
        arr = np.asarray(ids)
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise SftDataError(f"{where}: token id out of range [0, {vocab_size}): {int(arr.min())}..{int(arr.max())}")


def read_rows(data_dir: str | Path, columns: tuple[str, ...] = TRAIN_COLUMNS) -> Iterator[dict[str, Any]]:
    """All rows of an SFT dataset, in file order, without Ray (plain loops, tests, benchmarks)."""
    import pyarrow.parquet as pq

    for f in parquet_files(data_dir):
        table = pq.read_table(f, columns=list(columns))
        yield from table.to_pylist()


def write_dataset(out_dir: str | Path, rows: list[dict[str, Any]], tokenizer, *, tokenizer_name: str,
                  max_length: int, rows_per_file: int = 10_000) -> SftMeta:
    """Write rows in the SFT format plus meta.json (tests, benchmarks; the real builder lives in raydistill.sft)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("sample", pa.int32()), ("kind", pa.string()),
                        ("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                        ("num_tokens", pa.int32()), ("num_loss_tokens", pa.int32())])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(rows), rows_per_file):
        chunk = rows[i:i + rows_per_file]
        cols = {name: [r[name] for r in chunk] for name in schema.names}
        pq.write_table(pa.table(cols, schema=schema), out / f"part-{i // rows_per_file:05d}.parquet")
    meta = {"tokenizer": tokenizer_name, "vocab_size": len(tokenizer),
            "chat_template_sha256": chat_template_sha256(tokenizer), "max_length": max_length, "count": len(rows)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return SftMeta.from_dict(meta, str(out / "meta.json"))
