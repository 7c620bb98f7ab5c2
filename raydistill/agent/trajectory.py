"""The trajectory record: what teacher generation stores, SFT trains on, serving returns and evaluation grades.

One row per (question id, sample index). Steps keep the raw assistant text exactly as generated, because
that is what the student is trained to produce.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    raw_text: str
    """Assistant text exactly as generated (after `<end_code>` normalisation), ftp prefix included in step 0."""
    thought: str = ""
    code: str | None = None
    observation: str = ""
    """What the model sees next (the next user turn), already formatted and truncated."""
    exec_error: bool = False
    parse_error: bool = False
    is_final: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gen_s: float = 0.0
    exec_s: float = 0.0
    sag: str | None = None
    """JSON: {n, survived, groups: [[size, key, logprob]], chosen} when sag ran for this step."""


class Trajectory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    sample: int = 0
    source: str = ""
    domain: Literal["math", "qa"] = "math"
    question: str
    gold: list[str] = Field(default_factory=list)
    """Gold answer aliases (a single gold is a one-item list)."""
    kind: Literal["agent", "cot"] = "agent"
    steps: list[Step] = Field(default_factory=list)
    ftp_cot: str | None = None
    ftp_prefix: str | None = None
    final_answer: str | None = None
    max_steps_reached: bool = False
    fallback_answer: bool = False
    """The answer came from the after-the-step-limit request, not from a final_answer() call."""
    error: str | None = None
    """Episode-level failure (engine error, malformed output that could not be recovered), if any."""
    engine: str = ""
    model: str = ""
    sampling: str = "{}"
    system_prompt: Literal["teacher", "student"] = "teacher"
    duration_s: float = 0.0
    tools: list[str] = Field(default_factory=list)
    """Tools offered to the model besides final_answer (e.g. ["web_search"]); the chat rebuild lists the same."""
    fallback_text: str | None = None
    """Raw reply to the after-the-step-limit request (when max_steps_reached)."""
    # filled by grading
    correct: bool | None = None
    scores: str | None = None
    """JSON of grader outputs (em, f1, judge verdict ...)."""
    rejected: str | None = None
    """Why the filter rejected this trajectory (None = kept or not filtered yet)."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.id, self.sample)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def tool_calls(self) -> int:
        return sum(1 for s in self.steps if s.code and "web_search(" in s.code)

    def to_row(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Trajectory:
        return cls.model_validate(row)

    def sampling_dict(self) -> dict:
        return json.loads(self.sampling or "{}")


def _arrow_type(annotation: Any) -> pa.DataType:
    text = str(annotation)
    if "Step" in text:
        return pa.list_(STEP_STRUCT)
    if "list[str]" in text:
        return pa.list_(pa.string())
    if "bool" in text:
        return pa.bool_()
    if "int" in text and "float" not in text:
        return pa.int64()
    if "float" in text:
        return pa.float64()
    return pa.string()


STEP_STRUCT = pa.struct([(n, _arrow_type(f.annotation)) for n, f in Step.model_fields.items()])
TRAJECTORY_SCHEMA = pa.schema([(n, _arrow_type(f.annotation)) for n, f in Trajectory.model_fields.items()])


def to_table(trajs: list[Trajectory]) -> pa.Table:
    return pa.Table.from_pylist([t.to_row() for t in trajs], schema=TRAJECTORY_SCHEMA)


def from_table(table: pa.Table) -> list[Trajectory]:
    return [Trajectory.from_row(r) for r in table.to_pylist()]
