"""Math answer equivalence: last `\\boxed{}`, fast string/number paths, math-verify in a killable worker.

Rules (METHOD.md §3):
- The answer is the content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces), else the raw text.
- Equal if the canonical strings match (spaces, `\\dfrac`/`\\tfrac`, `\\left`/`\\right` ignored), or both
  are plain numbers that match: EXACTLY when the gold is an integer (GSM-Hard's 13138981.0 is not
  13138980), within relative 1e-4 otherwise. Plain numbers may carry thousands separators, a currency
  sign, `%`, degrees, a `\\text{unit}` suffix, and the prediction an `x =` prefix; a percentage matches
  either reading (10% ~ 10 ~ 0.1). These paths run in the caller and never start a worker.
- Otherwise math-verify (sympy, LaTeX parsing) decides, with the same tolerance rule applied to two
  numeric expressions it did not already find equal. That part runs in a worker process from a small
  pool, with math-verify's own signal timeouts off; a comparison past its time limit kills the worker
  and counts as not equal. This is why it is safe to call from any thread, a Ray worker or a Serve
  replica, and with hostile input such as `\\boxed{9^{9^{9^{9}}}}`.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import MAX_EMAX, MIN_EMIN, Decimal, InvalidOperation, localcontext
from fractions import Fraction
from typing import Any

from raydistill.grading.worker_pool import CallTimeout, WorkerCrashed, WorkerError, WorkerPool

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
"""Per-comparison time limit for the symbolic (worker) part."""
REL_TOL = Decimal("1e-4")
DEFAULT_MEMORY_LIMIT_BYTES = 4 << 30
"""Address-space cap of each worker: `10^{10^{10}}` fails fast with MemoryError instead of swapping."""

# --------------------------------------------------------------------------------------------------
# Answer extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (balanced braces), or None.

    `\\boxed 5` (no braces) yields the next token. An unclosed last box falls back to the previous one.
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts[-8:]):  # bounded work on hostile input with many unclosed boxes
        i = start
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\":  # an escaped char such as \{ or \}
                    j += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
            continue  # unbalanced: try an earlier box
        if i > start:  # "\boxed 5"
            m = re.match(r"[^\s$]+", text[i:])
            if m:
                return m.group(0).rstrip(".,")
    return None


_MATH_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _unwrap_math(s: str) -> str:
    s = s.strip()
    changed = True
    while changed:
        changed = False
        for left, right in _MATH_WRAPPERS:
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                inner = s[len(left) : -len(right)].strip()
                if left.startswith("$") and "$" in inner:  # "$a$ and $b$" is not one wrapper
                    continue
                s, changed = inner, True
    return s


def extract_answer(text: str) -> tuple[str, bool]:
    """(answer, was_boxed): the last box's content, else the raw text; outer `$...$` removed."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return _unwrap_math(boxed), True
    return _unwrap_math(text), False


def _as_text(x: Any) -> str | None:
    if x is None:
        return None
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            return str(x)
        return str(int(x)) if x.is_integer() else repr(x)
    if isinstance(x, Fraction):
        return f"{x.numerator}/{x.denominator}" if x.denominator != 1 else str(x.numerator)
    return x if isinstance(x, str) else str(x)


# --------------------------------------------------------------------------------------------------
# Fast paths (no sympy, no worker)

_NOISE_RE = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])|\\[,;:! ]|\\displaystyle|\\limits")
_WS_RE = re.compile(r"\s+")


def _canonical(s: str) -> str:
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _NOISE_RE.sub("", s)
    s = _WS_RE.sub("", s)
    return s.rstrip(".")


# Applied to whitespace-collapsed text (single spaces), so the optional " ?" pieces cannot backtrack badly.
_NUM_RE = re.compile(
    r"""^(?P<sign>[-+\u2212]?)\ ?
    (?:\\\$|\$)?\ ?
    (?P<num>(?:\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)(?:\.\d*)?|\.\d+)
    (?P<exp>[eE][-+]?\d{1,6})?
    \ ?(?P<pct>\\?%|\\text\{\ ?\\?%\ ?\})?
    \ ?(?:\^\ ?\{?\ ?\\circ\ ?\}?|\u00b0|\\degree)?
    \ ?(?:\\(?:text|mbox|mathrm|textrm)\{\ ?[A-Za-z][A-Za-z .]*\})?
    $""",
    re.VERBOSE,
)
_ASSIGN_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)? ?= ?(?P<rhs>[^=]+)$")
_MAX_NUMBER_CHARS = 1000


def _parse_number(s: str) -> tuple[Decimal, bool] | None:
    """(value, is_percent) for a plain number such as `-1,234.5`, `\\$5`, `10\\%`, `90^\\circ`, `5\\text{ cm}`."""
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    m = _NUM_RE.match(s)
    if m is None:
        return None
    digits = m["num"].replace("{,}", "").replace(",", "")
    try:
        v = Decimal(digits + (m["exp"] or ""))
    except InvalidOperation:
        return None
    if m["sign"] in ("-", "\u2212"):
        v = -v
    return v, m["pct"] is not None


def _decimal_context(ctx) -> None:
    ctx.prec, ctx.Emax, ctx.Emin = 60, MAX_EMAX, MIN_EMIN  # exponents up to 1e999999 never overflow


def _numbers_equal(pred: Decimal, gold: Decimal) -> bool:
    """Exact when the gold is an integer, else within relative REL_TOL."""
    with localcontext() as ctx:
        _decimal_context(ctx)
        if gold == gold.to_integral_value():
            return pred == gold
        return abs(pred - gold) <= REL_TOL * abs(gold)


def _fast_compare(pred: str, gold: str) -> bool | None:
    """True/False when decidable without sympy; None when the symbolic path must decide."""
    if _canonical(pred) == _canonical(gold):
        return True
    # thin spaces (`10\\,080`, `10,\\!080`) are LaTeX noise; whitespace is collapsed for the regexes
    pred, gold = (" ".join(_NOISE_RE.sub("", x).split()) for x in (pred, gold))
    g = _parse_number(gold)
    if g is None:
        return None
    if "=" not in gold:
        m = _ASSIGN_RE.match(pred)
        if m:
            pred = m["rhs"]
    p = _parse_number(pred)
    if p is None:
        return None
    (gv, gpct), (pv, ppct) = g, p
    if gpct == ppct:
        return _numbers_equal(pv, gv)
    with localcontext() as ctx:
        _decimal_context(ctx)
        if gpct:
            return _numbers_equal(pv, gv) or _numbers_equal(pv, gv / 100)
        return _numbers_equal(pv, gv) or _numbers_equal(pv / 100, gv)


# --------------------------------------------------------------------------------------------------
# Symbolic path (runs inside a worker process)

_PROSE_RE = re.compile(r"[A-Za-z]{3,}")  # a word, once LaTeX commands and \text{} are gone
_TEXT_CMD_RE = re.compile(r"\\(?:text|mbox|mathrm|textrm|textbf|operatorname)\{[^{}]*\}|\\[A-Za-z]+")


def _looks_like_prose(s: str) -> bool:
    return "$" in s or "\\(" in s or bool(_PROSE_RE.search(_TEXT_CMD_RE.sub(" ", s)))


def symbolic_equal(pred: str, gold: str, pred_boxed: bool = True) -> bool:
    """math-verify equivalence plus the numeric tolerance rule. No time limit: call via the pool."""
    from math_verify import parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    if not gold_parsed:
        return False
    g = _first_expr(gold_parsed)
    # An unboxed free-text answer ("The answer is $5$.", "5 apples"): first let math-verify find the
    # math in the text, then (only if that fails) read the whole text as one LaTeX expression.
    prose = not pred_boxed and _looks_like_prose(pred)
    texts = [pred, "\\boxed{" + pred + "}"] if prose else ["\\boxed{" + pred + "}"]
    candidates = []
    for text in texts:
        cand = parse(text, parsing_timeout=None)
        if not cand:
            continue
        candidates.append(cand)
        if verify(gold_parsed, cand, timeout_seconds=None):
            p = _first_expr(cand)
            if g is None or p is None or _within_tolerance(g, p) is not False:
                return True
            # math-verify said equal but the values differ beyond our tolerance: it compares
            # differences with evalf(chop=True), which calls 2/2^98 equal to 1/2^98; we don't
    if g is None:
        return False
    return any(_within_tolerance(g, p) is True for p in map(_first_expr, candidates) if p is not None)


def _first_expr(parsed: list) -> Any:
    from sympy import Basic

    return next((x for x in parsed if isinstance(x, Basic)), None)


def _within_tolerance(gold: Any, pred: Any) -> bool | None:
    """For two plain numeric sympy values: the tolerance rule (exact for an integer gold, else relative
    REL_TOL). None when the rule does not apply (symbols, sets, relations, percentages) or evaluation fails.
    """
    from sympy import Abs, S, UnevaluatedExpr

    try:
        if gold.has(UnevaluatedExpr) or pred.has(UnevaluatedExpr):  # percentages: math-verify's call
            return None
        gold, pred = gold.doit(), pred.doit()
        if not (getattr(gold, "is_number", False) and getattr(pred, "is_number", False)):
            return None
        if gold.is_zero:
            return bool(Abs(pred).evalf(30) == 0)
        err = Abs((pred - gold) / gold).evalf(30)
        if not err.is_Number or err is S.NaN or err.is_infinite:  # zoo, nan
            return None
        integer_gold = bool(gold.is_integer) or bool(gold.is_Float and gold == int(gold))
        return bool(err <= (1e-12 if integer_gold else float(REL_TOL)))
    except Exception:
        return None


def _worker_setup() -> None:
    """Imported in each worker before its first call: pay for sympy once, silence math-verify's warning."""
    import math_verify  # noqa: F401

    logging.getLogger("math_verify").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------------
# Pool management

_pool: WorkerPool | None = None
_pool_lock = threading.Lock()
_pool_size: int | None = None
_memory_limit: int | None = DEFAULT_MEMORY_LIMIT_BYTES


def _default_pool_size() -> int:
    env = os.environ.get("RAYDISTILL_GRADING_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(4, os.cpu_count() or 1))


def get_pool() -> WorkerPool:
    """The process-wide grading pool (created on first use; re-created in a forked child)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():
            _pool = WorkerPool(_pool_size or _default_pool_size(),
                               preload=("raydistill.grading.math:_worker_setup",),
                               memory_limit_bytes=_memory_limit)
        return _pool


def configure(*, workers: int | None = None, memory_limit_bytes: int | None = DEFAULT_MEMORY_LIMIT_BYTES) -> None:
    """Set the pool size (default min(4, cpus) or $RAYDISTILL_GRADING_WORKERS) and worker memory cap.

    Replaces the current pool (its idle workers are stopped). `memory_limit_bytes=None` disables the cap.
    """
    global _pool_size, _memory_limit
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _pool_size, _memory_limit = workers, memory_limit_bytes
    shutdown()


def warm_up(workers: int | None = None) -> None:
    """Start grading workers now (e.g. in an actor's __init__) so first comparisons don't wait for imports."""
    get_pool().warm(workers)


def shutdown() -> None:
    """Stop the grading workers; the next comparison that needs one starts a new pool."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


atexit.register(shutdown)


# --------------------------------------------------------------------------------------------------
# Public API


def _gold_answers(gold: Any) -> list[str]:
    """The gold as a list of answers (a list/tuple/array holds aliases, any one counts); ValueError if none."""
    items = gold.tolist() if hasattr(gold, "tolist") else gold
    items = list(items) if isinstance(items, (list, tuple)) else [items]
    answers = []
    for item in items:
        text = _as_text(item)
        if text is None or not text.strip():
            continue
        ans, _ = extract_answer(text)
        if not ans:
            raise ValueError(f"math_equal: the gold answer {item!r} has an empty \\boxed{{}}")
        answers.append(ans)
    if not answers:
        raise ValueError(f"math_equal: the gold answer is empty ({gold!r})")
    return answers


def _prepare(pred: Any, gold: Any) -> tuple[str, bool, list[str]] | None:
    """(pred answer, was boxed, gold answers), or None when the prediction is empty."""
    golds = _gold_answers(gold)
    pred_s = _as_text(pred)
    if pred_s is None or not pred_s.strip():
        return None
    pred_ans, pred_boxed = extract_answer(pred_s)
    if not pred_ans:
        return None
    return pred_ans, pred_boxed, golds


def _fast_any(pred_ans: str, golds: list[str]) -> tuple[bool | None, list[str]]:
    """(True, []) if a gold matches on a fast path; (False, []) if all are decided unequal;
    (None, undecided golds) otherwise."""
    pending = []
    for g in golds:
        r = _fast_compare(pred_ans, g)
        if r:
            return True, []
        if r is None:
            pending.append(g)
    return (None, pending) if pending else (False, [])


def _symbolic_any(pred_ans: str, pred_boxed: bool, golds: list[str], timeout: float | None) -> bool:
    return any(_symbolic_with_limit(pred_ans, g, pred_boxed, timeout) for g in golds)


def _fast_verdict(pred: Any, gold: Any) -> tuple[bool | None, tuple[str, bool, list[str]]]:
    """(verdict, args): the verdict when no symbolic comparison is needed; else None and the
    (pred answer, was boxed, undecided golds) that `_symbolic_any` must decide. ValueError on a bad gold."""
    prepared = _prepare(pred, gold)
    if prepared is None:
        return False, ("", False, [])
    pred_ans, pred_boxed, golds = prepared
    fast, pending = _fast_any(pred_ans, golds)
    return fast, (pred_ans, pred_boxed, pending)


# Python-style scientific notation: needs a signed exponent or a decimal point, so `2e` (2 times e) stays
_SCI_RE = re.compile(r"(?<![\w.^_])(?:\d+\.\d*|\.\d+|\d+(?=[eE][-+]))[eE][-+]?\d{1,3}(?![\w.])")


def _positional(s: str) -> str:
    """`4.46752e-05` -> `0.0000446752`: LaTeX parsing would read that `e` as Euler's number."""
    return _SCI_RE.sub(lambda m: format(Decimal(m.group()), "f"), s.strip())


def _short(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _symbolic_with_limit(pred_ans: str, gold_ans: str, pred_boxed: bool, timeout: float | None) -> bool:
    limit = DEFAULT_TIMEOUT_S if timeout is None else timeout
    try:
        return bool(get_pool().call(symbolic_equal, _positional(pred_ans), _positional(gold_ans), pred_boxed,
                                    timeout=limit))
    except CallTimeout:
        log.warning("math_equal: comparison ran past %.1fs, counted as not equal: pred=%r gold=%r",
                    limit, _short(pred_ans), _short(gold_ans))
    except (WorkerCrashed, WorkerError) as e:
        log.warning("math_equal: comparison failed, counted as not equal: pred=%r gold=%r: %s",
                    _short(pred_ans), _short(gold_ans), str(e).splitlines()[0])
    return False


def math_equal(pred: Any, gold: Any, *, timeout: float | None = None) -> bool:
    """Is the prediction's final answer equivalent to the gold? See the module docstring for the rules.

    `pred`: model output or final answer (str, number, anything with a str()); None/empty -> False.
    `gold`: the gold answer (str or number), or a list of acceptable answers; empty -> ValueError.
    `timeout`: seconds for each symbolic comparison (default DEFAULT_TIMEOUT_S); past it, not equal.
    """
    fast, args = _fast_verdict(pred, gold)
    if fast is not None:
        return fast
    return _symbolic_any(*args, timeout)


async def amath_equal(pred: Any, gold: Any, *, timeout: float | None = None) -> bool:
    """`math_equal` for event-loop code (agent episodes, Serve replicas): the wait runs in a thread."""
    fast, args = _fast_verdict(pred, gold)
    if fast is not None:
        return fast
    return await asyncio.to_thread(_symbolic_any, *args, timeout)


def math_equal_many(preds: Sequence[Any], golds: Sequence[Any], *, timeout: float | None = None,
                    max_workers: int | None = None) -> list[bool]:
    """`math_equal` over pairs; the pairs needing sympy run in parallel across the worker pool."""
    if len(preds) != len(golds):
        raise ValueError(f"math_equal_many: {len(preds)} predictions but {len(golds)} golds")
    out: list[bool | None] = [None] * len(preds)
    pending: list[tuple[int, str, bool, list[str]]] = []
    for i, (p, g) in enumerate(zip(preds, golds, strict=True)):
        try:
            fast, args = _fast_verdict(p, g)
        except ValueError as e:
            raise ValueError(f"math_equal_many: pair {i}: {e}") from e
        if fast is not None:
            out[i] = fast
        else:
            pending.append((i, *args))
    if pending:
        n = max_workers or get_pool().size
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="math-equal") as ex:
            results = ex.map(lambda t: _symbolic_any(t[1], t[2], t[3], timeout), pending)
            for (i, *_), r in zip(pending, results, strict=True):
                out[i] = r
    return [bool(x) for x in out]
