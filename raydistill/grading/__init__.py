"""Answer grading: math equivalence (math-verify in killable workers), QA EM/F1, optional LLM judge.

No Ray here. `raydistill.grading.judge.LLMJudge` is imported on demand (it pulls in `openai`).
"""

from raydistill.grading.dispatch import DOMAINS, grade
from raydistill.grading.math import (
    DEFAULT_TIMEOUT_S,
    amath_equal,
    configure,
    extract_answer,
    extract_boxed,
    math_equal,
    math_equal_many,
    shutdown,
    warm_up,
)
from raydistill.grading.qa import extract_qa_answer, normalize_answer, qa_scores

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DOMAINS",
    "amath_equal",
    "configure",
    "extract_answer",
    "extract_boxed",
    "extract_qa_answer",
    "grade",
    "math_equal",
    "math_equal_many",
    "normalize_answer",
    "qa_scores",
    "shutdown",
    "warm_up",
]


def __getattr__(name: str):
    if name in ("LLMJudge", "JudgeVerdict", "JudgeError"):
        from raydistill.grading import judge

        return getattr(judge, name)
    raise AttributeError(f"module 'raydistill.grading' has no attribute {name!r}")
