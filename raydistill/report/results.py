"""The evaluation result row: a graded trajectory plus which model, mode and benchmark produced it.

Evaluation writes these rows as Parquet (`<run_dir>/eval/results/`); the report reads them back. Derived
fields (steps, tool calls, failure reason) are computed once here so every consumer agrees on them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.agent.trajectory import TRAJECTORY_SCHEMA, Trajectory

EXTRA_FIELDS: list[tuple[str, pa.DataType]] = [
    ("model_label", pa.string()),
    ("mode", pa.string()),
    ("benchmark", pa.string()),
    ("adapter", pa.string()),
    ("model_size_b", pa.float64()),
    ("num_steps", pa.int64()),
    ("tool_calls", pa.int64()),
    ("parse_errors", pa.int64()),
    ("exec_errors", pa.int64()),
    ("sag_steps", pa.int64()),
    ("failure", pa.string()),
]
RESULT_SCHEMA = pa.schema([*EXTRA_FIELDS, *[f for f in TRAJECTORY_SCHEMA if f.name not in dict(EXTRA_FIELDS)]])

FAILURES = ("error", "no_answer", "max_steps_reached", "wrong_answer", "ungraded")


def failure_reason(traj: Trajectory) -> str | None:
    """Why a graded trajectory is not correct (None when it is), most fundamental cause first."""
    if traj.correct:
        return None
    if traj.error:
        return "error"
    if traj.final_answer is None or not str(traj.final_answer).strip():
        return "no_answer"
    if traj.correct is None:
        return "ungraded"
    if traj.max_steps_reached:
        return "max_steps_reached"
    return "wrong_answer"


def error_kind(error: str | None) -> str | None:
    """A short, groupable label for an episode error message ('context window exceeded', 'EngineError')."""
    if not error:
        return None
    head = error.split(":", 1)[0].strip()
    return head[:60] or "error"


def result_row(traj: Trajectory, *, model_label: str, mode: str, benchmark: str, adapter: str | None,
               model_size_b: float | None) -> dict[str, Any]:
    row = traj.to_row()
    row.update(
        model_label=model_label, mode=mode, benchmark=benchmark, adapter=adapter, model_size_b=model_size_b,
        num_steps=len(traj.steps), tool_calls=traj.tool_calls,
        parse_errors=sum(s.parse_error for s in traj.steps), exec_errors=sum(s.exec_error for s in traj.steps),
        sag_steps=sum(1 for s in traj.steps if s.sag), failure=failure_reason(traj),
    )
    return row


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def read_results(root: str | Path) -> list[dict[str, Any]]:
    """All result rows under `root` (recursively, every *.parquet), deduplicated by (model, mode, id, sample):
    a re-run part wins over an older one (file names sort by write order)."""
    root = Path(root)
    if not root.exists():
        return []
    rows: dict[tuple, dict] = {}
    for f in sorted(root.rglob("*.parquet")):
        table = pq.read_table(f)
        missing = [n for n in ("model_label", "mode", "id") if n not in table.column_names]
        if missing:
            raise ValueError(f"{f}: not an evaluation result file (missing columns {missing})")
        for r in table.to_pylist():
            rows[(r["model_label"], r["mode"], r["id"], r.get("sample", 0))] = r
    return list(rows.values())


def done_keys(root: str | Path) -> set[tuple[str, str, str]]:
    """(model_label, mode, id) of every finished result under `root` - what a resumed run skips."""
    root = Path(root)
    if not root.exists():
        return set()
    keys: set[tuple[str, str, str]] = set()
    for f in root.rglob("*.parquet"):
        t = pq.read_table(f, columns=["model_label", "mode", "id"])
        keys.update(zip(t["model_label"].to_pylist(), t["mode"].to_pylist(), t["id"].to_pylist(), strict=True))
    return keys


def scores_of(row: dict[str, Any]) -> dict[str, Any]:
    raw = row.get("scores")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return {}


def rows_to_trajectory(row: dict[str, Any]) -> Trajectory:
    fields = Trajectory.model_fields
    return Trajectory.model_validate({k: v for k, v in row.items() if k in fields})


def iter_groups(rows: Iterable[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out
