"""Aggregate result rows into the numbers the report shows (plain Python: no pandas dependency)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from raydistill.report.results import FAILURES, error_kind, iter_groups, scores_of

MODE_ORDER = {"agent": 0, "agent_sag": 1, "cot": 2, "rag_cot": 3}
IN_DOMAIN = ("hotpotqa", "math_500")
"""Benchmarks drawn from the training distributions (HotPotQA, MATH); the rest are out-of-domain."""


@dataclass
class Cell:
    n: int = 0
    correct: int = 0
    graded: int = 0
    f1_sum: float = 0.0
    f1_n: int = 0

    @property
    def accuracy(self) -> float | None:
        return None if self.graded == 0 else self.correct / self.graded

    @property
    def f1(self) -> float | None:
        return None if self.f1_n == 0 else self.f1_sum / self.f1_n


@dataclass
class Series:
    """One (model, mode) line of the report."""

    model_label: str
    mode: str
    model_size_b: float | None
    cells: dict[str, Cell] = field(default_factory=dict)
    n: int = 0
    steps_sum: int = 0
    tool_calls_sum: int = 0
    max_steps: int = 0
    parse_error_steps: int = 0
    exec_error_steps: int = 0
    total_steps: int = 0
    duration_sum: float = 0.0
    sag_candidates: int = 0
    sag_survived: int = 0
    failures: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    @property
    def key(self) -> tuple[str, str]:
        return (self.model_label, self.mode)

    @property
    def name(self) -> str:
        return f"{self.model_label} / {self.mode}"

    def macro_accuracy(self, benchmarks: list[str]) -> float | None:
        accs = [self.cells[b].accuracy for b in benchmarks if b in self.cells and self.cells[b].accuracy is not None]
        return None if not accs else sum(accs) / len(accs)


def _sort_key(s: Series) -> tuple:
    return (s.model_size_b if s.model_size_b is not None else float("inf"), s.model_label,
            MODE_ORDER.get(s.mode, 9), s.mode)


def summarize(rows: list[dict[str, Any]]) -> tuple[list[Series], list[str]]:
    """Series sorted by (size, model, mode) and the benchmark names in first-seen order."""
    benchmarks: list[str] = []
    for r in rows:
        if r["benchmark"] not in benchmarks:
            benchmarks.append(r["benchmark"])
    series: list[Series] = []
    for (label, mode), group in iter_groups(rows, "model_label", "mode").items():
        sizes = [r.get("model_size_b") for r in group if r.get("model_size_b")]
        s = Series(model_label=label, mode=mode, model_size_b=sizes[0] if sizes else None)
        for r in group:
            cell = s.cells.setdefault(r["benchmark"], Cell())
            cell.n += 1
            if r.get("correct") is not None:
                cell.graded += 1
                cell.correct += bool(r["correct"])
            f1 = scores_of(r).get("f1")
            if r.get("domain") == "qa" and f1 is not None:
                cell.f1_sum += float(f1)
                cell.f1_n += 1
            s.n += 1
            s.steps_sum += int(r.get("num_steps") or 0)
            s.tool_calls_sum += int(r.get("tool_calls") or 0)
            s.max_steps += bool(r.get("max_steps_reached"))
            s.parse_error_steps += int(r.get("parse_errors") or 0)
            s.exec_error_steps += int(r.get("exec_errors") or 0)
            s.total_steps += int(r.get("num_steps") or 0)
            s.duration_sum += float(r.get("duration_s") or 0.0)
            s.failures[r.get("failure") or "correct"] += 1
            kind = error_kind(r.get("error"))
            if kind:
                s.errors[kind] += 1
            for step in r.get("steps") or []:
                sag = step.get("sag") if isinstance(step, dict) else None
                if sag:
                    rec = json.loads(sag)
                    s.sag_candidates += int(rec.get("n", 0))
                    s.sag_survived += int(rec.get("survived", 0))
        series.append(s)
    series.sort(key=_sort_key)
    return series, sorted(benchmarks, key=lambda b: (_is_math(b), b))


def _is_math(name: str) -> bool:
    return name.lower().startswith(("math", "aime", "olymath", "gsm"))


def failure_columns(series: list[Series]) -> list[str]:
    seen = {k for s in series for k in s.failures}
    return ["correct", *[f for f in FAILURES if f in seen]]


def is_agent_mode(mode: str) -> bool:
    return mode.startswith("agent")
