"""Factual-QA scores: SQuAD-style exact match and token F1, max over gold aliases."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable
from typing import Any

from raydistill.grading.math import extract_boxed

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox)\{([^{}]*)\}")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def extract_qa_answer(pred: str) -> str:
    """The answer inside the last `<answer>...</answer>` or `\\boxed{...}`, else the whole text.

    `\\text{...}` wrappers (common inside boxes) are unwrapped.
    """
    tags = _ANSWER_TAG_RE.findall(pred)
    if tags:
        pred = tags[-1]
    boxed = extract_boxed(pred)
    if boxed is not None:
        pred = boxed
    prev = None
    while prev != pred:
        prev, pred = pred, _TEXT_CMD_RE.sub(r"\1", pred)
    return pred.strip()


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:  # SQuAD: F1 is EM when either side has no tokens
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_aliases(gold: Any) -> list[str]:
    """`gold` as a list of non-empty alias strings; ValueError when there is none."""
    if isinstance(gold, str):
        aliases = [gold]
    elif isinstance(gold, Iterable):
        aliases = list(gold)
    elif gold is None:
        aliases = []
    else:
        aliases = [str(gold)]
    bad = [a for a in aliases if not isinstance(a, str)]
    if bad:
        raise ValueError(f"qa gold aliases must be strings, got {bad[0]!r} in {gold!r}")
    aliases = [a for a in aliases if a.strip()]
    if not aliases:
        raise ValueError(f"qa gold answer is empty ({gold!r})")
    return aliases


def qa_scores(pred: Any, gold: str | Iterable[str]) -> dict[str, float]:
    """{"em": 0.0|1.0, "f1": float in [0, 1]}: max over gold aliases after SQuAD normalisation.

    `pred` None/empty scores 0. The prediction is first unwrapped from `<answer>` tags / `\\boxed{}`.
    """
    aliases = gold_aliases(gold)
    if pred is None:
        return {"em": 0.0, "f1": 0.0}
    p = normalize_answer(extract_qa_answer(str(pred)))
    p_tokens = p.split()
    em = f1 = 0.0
    for a in aliases:
        g = normalize_answer(a)
        em = max(em, float(p == g))
        f1 = max(f1, _f1(p_tokens, g.split()))
    return {"em": em, "f1": f1}
