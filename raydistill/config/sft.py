"""SFT dataset building (METHOD.md §4)."""

from __future__ import annotations

from pydantic import Field

from raydistill.config.base import Section


class SftConfig(Section):
    max_length: int = Field(10_240, ge=64)
    cot_max_length: int = Field(4096, ge=64)
    system_prompt: str = "student"
