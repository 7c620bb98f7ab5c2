"""Evaluation over the benchmark sets and the report (METHOD.md §6)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydistill.config.base import Section


class EvaluateConfig(Section):
    sets: list[str] | None = None
    """Default: data.test_sets."""
    limit: int | None = Field(None, ge=1)
    modes: list[Literal["agent", "agent_sag", "cot", "rag_cot"]] = ["agent"]
    endpoint: str | None = None
    """Evaluate against a running Serve endpoint instead of offline engines."""
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = None
    num_workers: int = Field(1, ge=1)
    concurrency: int = Field(32, ge=1)
