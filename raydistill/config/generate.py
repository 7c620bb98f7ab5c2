"""Teacher trajectory generation (METHOD.md §2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydistill.config.base import Section


class GenerateConfig(Section):
    kinds: list[Literal["agent", "cot"]] = ["agent"]
    samples_per_question: int = Field(1, ge=1)
    sample_temperature: float = Field(0.7, ge=0)
    """Temperature used when samples_per_question > 1 (greedy otherwise)."""
    max_correct_per_question: int = Field(1, ge=1)
    num_workers: int = Field(1, ge=1)
    """Teacher actors (each holds one engine)."""
    episodes_per_worker: int = Field(64, ge=1)
    """Concurrent episodes per teacher actor."""
    batch_size: int = Field(64, ge=1)
    shard_rows: int = Field(256, ge=1)
    keep_all_for_smoke: bool = False
    """Keep every trajectory in the SFT data even if it fails the filter (smoke runs with random models only)."""
