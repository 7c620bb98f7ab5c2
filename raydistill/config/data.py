"""Which bundled (or external) question sets a run uses."""

from __future__ import annotations

from pydantic import Field

from raydistill.config.base import Section


class DataConfig(Section):
    train_sets: list[str] = ["hotpotqa_1000", "math_1000", "math_medium_1000"]
    test_sets: list[str] = [
        "hotpotqa_500", "musique_500", "2wikimultihopqa_500", "bamboogle_125",
        "math_500", "gsm_hard_500", "aime_90", "olymath_200",
    ]
    limit: int | None = Field(None, ge=1)
    """Take at most this many questions per set (first N, deterministic); None = all."""
    strict: bool = False
    """Bad rows raise (naming file and row) instead of being skipped and counted."""
