"""Self-consistent action generation (METHOD.md §5): N candidates, each run in its own fork, majority vote.

Unlike the reference, candidates never touch the live interpreter: each runs in a fork of the episode's
state, all in parallel; the vote key is (printed output, last value, final answer), so two candidates
answering 'A' and 'B' with no output are different groups; ties between equally large groups go to the
higher summed log-probability (then the lower sample index); only the winner's fork is kept.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from typing import Any

from raydistill.agent.parsing import Action

VoteKey = tuple[str, str, str | None]


@dataclass
class Candidate:
    """One sampled action and, once executed, its result and the fork it ran in."""

    index: int
    text: str
    action: Action
    logprob: float | None = None
    result: Any = None
    """A sandbox Result (stdout, value, error, is_final, final_answer, duration_s) or None."""
    exec_error: str | None = None
    fork: Any = None
    exec_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def survived(self) -> bool:
        return self.action.ok and self.result is not None and self.exec_error is None

    def key(self) -> VoteKey:
        r = self.result
        final = _norm(r.final_answer) if getattr(r, "is_final", False) else None
        return (r.stdout or "", _norm(r.value), final)


def _norm(v: Any) -> str:
    return "" if v is None else str(v)


def _lp(c: Candidate) -> float:
    return -math.inf if c.logprob is None or math.isnan(c.logprob) else c.logprob


@dataclass
class Vote:
    chosen: int | None
    """Index of the winning candidate (None when none survived)."""
    groups: list[tuple[int, VoteKey, float, list[int]]]
    """Sorted best first: (size, key, best summed logprob, member indices)."""
    n: int
    survived: int

    def to_json(self, max_key_chars: int = 200) -> str:
        groups = [
            [size, [k[:max_key_chars] if isinstance(k, str) else k for k in key],
             None if math.isinf(lp) else round(lp, 4), members]
            for size, key, lp, members in self.groups
        ]
        return json.dumps({"n": self.n, "survived": self.survived, "groups": groups, "chosen": self.chosen})


def vote(candidates: list[Candidate]) -> Vote:
    """Group survivors by result; largest group wins, ties by best summed logprob, then lowest index.

    Within the winning group the member with the highest logprob (then lowest index) is chosen.
    """
    survivors = [c for c in candidates if c.survived]
    by_key: dict[VoteKey, list[Candidate]] = {}
    for c in survivors:
        by_key.setdefault(c.key(), []).append(c)
    groups = []
    for key, members in by_key.items():
        best = max(members, key=lambda c: (_lp(c), -c.index))
        groups.append((len(members), key, _lp(best), [c.index for c in members], best))
    groups.sort(key=lambda g: (-g[0], -g[2], min(g[3])))
    chosen = groups[0][4].index if groups else None
    return Vote(chosen=chosen, groups=[g[:4] for g in groups], n=len(candidates), survived=len(survivors))


async def execute_candidates(sandbox: Any, candidates: list[Candidate]) -> None:
    """Run every parsed candidate in its own fork of `sandbox`, in parallel. Never raises for candidate
    failures (they become `exec_error`); forks are left open on the candidates for the caller to commit/close.
    """
    import time

    runnable = [c for c in candidates if c.action.ok]
    if not runnable:
        return
    forks: list[Any] = []
    if hasattr(sandbox, "afork_many"):  # one round trip for all forks
        try:
            forks = list(await sandbox.afork_many(len(runnable)))
        except asyncio.CancelledError:
            raise
        except Exception:  # fall back to one fork per candidate, where failures stay per candidate
            forks = []

    async def one(c: Candidate, fork: Any) -> None:
        t0 = time.perf_counter()
        try:
            c.fork = fork if fork is not None else await sandbox.afork()
            c.result = await c.fork.arun(c.action.code)
            c.exec_error = c.result.error
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a sandbox failure counts as this candidate's failure
            c.exec_error = f"{type(e).__name__}: {e}"
        c.exec_s = time.perf_counter() - t0

    for c, f in zip(runnable, forks, strict=False):
        c.fork = f  # owned by the candidate from here on, so the caller closes it whatever happens
    await asyncio.gather(*(one(c, c.fork) for c in runnable))
