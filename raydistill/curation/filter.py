"""Grading and filtering of teacher trajectories (METHOD.md §2) and the filter report.

Keep a trajectory only if its final answer is judged correct, no step had a code parse error, and it did not
hit the step limit (nor got its answer from the after-the-limit request). A code *execution* error the agent
recovered from is kept on purpose: it teaches recovery. Every rejected trajectory records why (all reasons,
comma-separated, most basic first) in `Trajectory.rejected`; the report counts them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from raydistill.agent.trajectory import Trajectory

log = logging.getLogger(__name__)

# Order = precedence of the "primary" reason (the first one listed).
REASONS = (
    "error",            # the episode itself failed (engine error, context window, crash)
    "no_steps",         # nothing was generated
    "max_steps",        # the step limit was hit (METHOD.md §7: the reference never checked this)
    "fallback_answer",  # the answer came from the after-the-limit request, not final_answer()
    "parse_error",      # some step's code could not be parsed
    "no_answer",        # no final answer
    "wrong_answer",     # graded incorrect
    "over_cap",         # correct, but the question already has max_correct_per_question kept
)


def grade_trajectory(traj: Trajectory, *, f1_threshold: float | None = None) -> Trajectory:
    """Fill `correct` and `scores` (in place; returns it). No answer counts as incorrect, not as an error."""
    from raydistill.grading import grade

    if traj.final_answer is None or not traj.gold:
        traj.correct = False
        traj.scores = json.dumps({"correct": False, "reason": "no answer" if traj.gold else "no gold"})
        return traj
    try:
        scores = grade(traj.final_answer, traj.gold, traj.domain, f1_threshold=f1_threshold)
    except Exception as e:  # a grader failure must not lose the trajectory; it is recorded and not kept
        log.warning("grading %s failed: %s", traj.key, e)
        scores = {"correct": False, "grading_error": f"{type(e).__name__}: {e}"}
    traj.correct = bool(scores.get("correct"))
    traj.scores = json.dumps(scores, default=str)
    return traj


def rejection_reasons(traj: Trajectory) -> list[str]:
    """Every reason (in REASONS order) this trajectory fails the filter, excluding the per-question cap."""
    if traj.correct is None:
        raise ValueError(f"trajectory {traj.key} is not graded; call grade_trajectory first")
    reasons = []
    if traj.error:
        reasons.append("error")
    if not traj.steps:
        reasons.append("no_steps")
    if traj.max_steps_reached:
        reasons.append("max_steps")
    if traj.fallback_answer:
        reasons.append("fallback_answer")
    if any(s.parse_error for s in traj.steps):
        reasons.append("parse_error")
    if traj.final_answer is None:
        reasons.append("no_answer")
    elif traj.correct is False:
        reasons.append("wrong_answer")
    return reasons


def recovered_exec_error(traj: Trajectory) -> bool:
    return any(s.exec_error for s in traj.steps)


@dataclass
class FilterResult:
    trajectories: list[Trajectory]
    """All trajectories, graded, with `rejected` set on the rejected ones (sorted by key)."""
    kept: list[Trajectory]
    """What goes to SFT: the passing ones (or, in smoke mode, every usable one)."""
    report: dict[str, Any] = field(default_factory=dict)


def apply_filter(trajs: list[Trajectory], *, max_correct_per_question: int = 1,
                 keep_all_for_smoke: bool = False, kind: str | None = None,
                 f1_threshold: float | None = None) -> FilterResult:
    """Grade what is not graded yet, set `rejected`, cap passing ones per question, and build the report."""
    if max_correct_per_question < 1:
        raise ValueError(f"max_correct_per_question must be >= 1, got {max_correct_per_question}")
    trajs = sorted(trajs, key=lambda t: t.key)
    per_question: dict[str, int] = defaultdict(int)
    for t in trajs:
        if t.correct is None:
            grade_trajectory(t, f1_threshold=f1_threshold)
        reasons = rejection_reasons(t)
        if not reasons:
            if per_question[t.id] >= max_correct_per_question:
                reasons = ["over_cap"]
            else:
                per_question[t.id] += 1
        t.rejected = ",".join(reasons) if reasons else None
    passing = [t for t in trajs if t.rejected is None]
    if keep_all_for_smoke:
        kept = [t for t in trajs if t.steps]
    else:
        kept = passing
    report = build_report(trajs, kept, kind=kind, max_correct_per_question=max_correct_per_question,
                          keep_all_for_smoke=keep_all_for_smoke)
    return FilterResult(trajectories=trajs, kept=kept, report=report)


def _rate(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def build_report(trajs: list[Trajectory], kept: list[Trajectory], *, kind: str | None,
                 max_correct_per_question: int, keep_all_for_smoke: bool) -> dict[str, Any]:
    """Counts, pass rate overall and by source, rejection reasons (primary and any), step/token stats."""
    passing = [t for t in trajs if t.rejected is None]
    by_source: dict[str, dict[str, Any]] = {}
    for src in sorted({t.source for t in trajs}):
        ts = [t for t in trajs if t.source == src]
        n_pass = sum(1 for t in ts if t.rejected is None)
        by_source[src or "(none)"] = {
            "total": len(ts),
            "questions": len({t.id for t in ts}),
            "correct": sum(1 for t in ts if t.correct),
            "passed": n_pass,
            "pass_rate": _rate(n_pass, len(ts)),
            "accuracy": _rate(sum(1 for t in ts if t.correct), len(ts)),
        }
    primary = Counter(t.rejected.split(",")[0] for t in trajs if t.rejected)
    anyr = Counter(r for t in trajs if t.rejected for r in t.rejected.split(","))
    steps = [t.num_steps for t in trajs]
    gen_tokens = sum(s.completion_tokens for t in trajs for s in t.steps)
    return {
        "kind": kind,
        "total": len(trajs),
        "questions": len({t.id for t in trajs}),
        "correct": sum(1 for t in trajs if t.correct),
        "passed": len(passing),
        "pass_rate": _rate(len(passing), len(trajs)),
        "questions_with_passing": len({t.id for t in passing}),
        "kept_for_sft": len(kept),
        "keep_all_for_smoke": keep_all_for_smoke,
        "max_correct_per_question": max_correct_per_question,
        "passed_with_recovered_exec_error": sum(1 for t in passing if recovered_exec_error(t)),
        "by_source": by_source,
        "rejected": sum(1 for t in trajs if t.rejected),
        "reasons_primary": {r: primary[r] for r in REASONS if primary[r]},
        "reasons_any": {r: anyr[r] for r in REASONS if anyr[r]},
        "errors": dict(Counter((t.error or "").split(":")[0] for t in trajs if t.error).most_common(10)),
        "mean_steps": round(sum(steps) / len(steps), 3) if steps else None,
        "generated_tokens": gen_tokens,
    }
