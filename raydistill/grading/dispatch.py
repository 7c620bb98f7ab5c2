"""`grade(pred, gold, domain)`: one entry point over the math and QA graders."""

from __future__ import annotations

from typing import Any

from raydistill.grading.math import math_equal
from raydistill.grading.qa import qa_scores

DOMAINS = ("math", "qa")


def grade(pred: Any, gold: Any, domain: str, *, f1_threshold: float | None = None,
          timeout: float | None = None) -> dict[str, Any]:
    """Grade one prediction without an LLM judge.

    - "math" -> {"correct": bool} via `math_equal` (`timeout`: seconds for its symbolic part).
    - "qa"   -> {"correct": bool, "em": float, "f1": float}. "correct" means exact match after SQuAD
      normalisation against any alias, unless `f1_threshold` is given: then it means token F1 >= that
      threshold (e.g. 0.8 to forgive a stray word). The paper's own QA verdict is an LLM judge
      (`raydistill.grading.judge.LLMJudge`); EM is the conservative stand-in when none is configured.
    """
    if domain == "math":
        return {"correct": math_equal(pred, gold, timeout=timeout)}
    if domain == "qa":
        if f1_threshold is not None and not 0.0 < f1_threshold <= 1.0:
            raise ValueError(f"f1_threshold must be in (0, 1], got {f1_threshold}")
        s = qa_scores(pred, gold)
        correct = s["em"] == 1.0 if f1_threshold is None else s["f1"] >= f1_threshold
        return {"correct": bool(correct), "em": s["em"], "f1": s["f1"]}
    raise ValueError(f"unknown grading domain {domain!r}; expected one of {DOMAINS}")
