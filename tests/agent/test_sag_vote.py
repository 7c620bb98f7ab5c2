"""The sag vote itself (pure): grouping key, majority, explicit tie-break, failures dropped."""

from __future__ import annotations

import json
from dataclasses import dataclass

from raydistill.agent.parsing import parse_action
from raydistill.agent.sag import Candidate, vote


@dataclass
class R:  # the fields of a sandbox Result that the vote reads
    stdout: str = ""
    value: str | None = None
    error: str | None = None
    is_final: bool = False
    final_answer: str | None = None


def cand(i, code, result, lp):
    c = Candidate(index=i, text=f"```py\n{code}\n```<end_code>", action=parse_action(f"```py\n{code}\n```"),
                  logprob=lp, result=result, exec_error=result.error if result else None)
    return c


def final(ans):
    return R(is_final=True, final_answer=ans)


def test_reference_flaw_final_answers_A_B_do_not_tie_on_empty_output():
    # the reference groups by printed output only: both have "", tie, first wins -> 'A'.
    # here they are different groups of size 1; the tie is broken by summed logprob -> 'B'.
    cs = [cand(0, "final_answer('A')", final("A"), -5.0), cand(1, "final_answer('B')", final("B"), -2.0)]
    v = vote(cs)
    assert v.chosen == 1
    assert len(v.groups) == 2 and all(g[0] == 1 for g in v.groups)


def test_group_size_beats_logprob():
    cs = [cand(0, "final_answer('A')", final("A"), -9.0), cand(1, "final_answer('B')", final("B"), -0.1),
          cand(2, "final_answer('A') ", final("A"), -8.0)]
    v = vote(cs)
    assert v.groups[0][0] == 2 and v.groups[0][3] == [0, 2]
    assert v.chosen == 2  # best logprob inside the winning group


def test_key_includes_value_and_stdout():
    cs = [cand(0, "1", R(value="1"), -1.0), cand(1, "2", R(value="2"), -1.0), cand(2, "2", R(value="2"), -3.0),
          cand(3, "print(2)", R(stdout="2\n"), -0.5)]
    v = vote(cs)
    assert v.chosen == 1 and v.groups[0][3] == [1, 2]


def test_failures_are_dropped_and_none_survive():
    cs = [cand(0, "1/0", R(error="ZeroDivisionError"), -0.1), cand(1, "x(", None, -0.2)]
    assert not cs[1].action.ok
    v = vote(cs)
    assert v.chosen is None and v.survived == 0 and v.groups == []
    cs.append(cand(2, "print(3)", R(stdout="3\n"), -7.0))
    assert vote(cs).chosen == 2


def test_missing_logprobs_fall_back_to_lowest_index():
    cs = [cand(0, "final_answer('A')", final("A"), None), cand(1, "final_answer('B')", final("B"), None)]
    assert vote(cs).chosen == 0


def test_vote_json():
    cs = [cand(0, "final_answer('A')", final("A"), -1.0)]
    d = json.loads(vote(cs).to_json())
    assert d == {"n": 1, "survived": 1, "groups": [[1, ["", "", "A"], -1.0, [0]]], "chosen": 0}
