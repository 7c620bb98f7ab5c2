"""SFT dataset building (METHOD.md §4)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydistill.config.base import Section


class SftConfig(Section):
    max_length: int = Field(10_240, ge=64)
    """Token limit of an agent example (the paper: 10,240)."""
    cot_max_length: int = Field(4096, ge=64)
    """Token limit of a CoT example."""
    overlong: Literal["drop", "truncate"] = "drop"
    """Examples over the limit: `drop` (default: a truncated trajectory loses its final answer and teaches an
    episode that never ends) or `truncate` (keep the first max_length tokens). Both are counted in meta.json."""
    system_prompt: str = "student"
    """System prompt of the training chats: `student` (the short prompt the student is served with)."""
    shard_rows: int = Field(2048, ge=1)
    """Rows per SFT Parquet file."""
