"""Filtering rules (METHOD.md §2), the report, and the shard store's atomicity/dedup (no Ray)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from raydistill.agent.trajectory import Step, Trajectory
from raydistill.curation import ShardError, TrajectoryStore, apply_filter, grade_trajectory

CODE = "```py\nfinal_answer('4')\n```<end_code>"


def _t(qid="math_1000/1", sample=0, **kw) -> Trajectory:
    base = dict(id=qid, sample=sample, source=qid.split("/")[0], domain="math", question="2+2?", gold=["4"],
                steps=[Step(raw_text="Thought: add.\n" + CODE, code="final_answer('4')", is_final=True)],
                final_answer="4")
    base.update(kw)
    return Trajectory(**base)


def test_filter_rules_and_reasons():
    bad_parse = Step(raw_text="no code here", parse_error=True, observation="Error: no code")
    failed_exec = Step(raw_text="Thought: oops\n```py\n1/0\n```<end_code>", code="1/0", exec_error=True,
                       observation="Error: ZeroDivisionError")
    trajs = [
        _t("math_1000/ok"),
        _t("math_1000/wrong", final_answer="5"),
        _t("math_1000/boxed", final_answer="\\boxed{4}"),
        _t("math_1000/parse", steps=[bad_parse, _t().steps[0]]),
        _t("math_1000/recovered", steps=[failed_exec, _t().steps[0]]),
        _t("math_1000/maxsteps", max_steps_reached=True, fallback_answer=True),
        _t("math_1000/noanswer", final_answer=None),
        _t("math_1000/error", steps=[], final_answer=None, error="EngineError: boom"),
        _t("hotpotqa_1000/qa", domain="qa", gold=["Paris", "Paris, France"], final_answer="paris"),
        _t("hotpotqa_1000/qa_wrong", domain="qa", gold=["Paris"], final_answer="Lyon"),
    ]
    res = apply_filter(trajs, kind="agent")
    why = {t.id.split("/")[1]: t.rejected for t in res.trajectories}
    assert why == {
        "ok": None, "wrong": "wrong_answer", "boxed": None, "parse": "parse_error",
        "recovered": None,  # a recovered execution error is kept on purpose
        "maxsteps": "max_steps,fallback_answer", "noanswer": "no_answer", "error": "error,no_steps,no_answer",
        "qa": None, "qa_wrong": "wrong_answer",
    }
    assert {t.id for t in res.kept} == {f"math_1000/{k}" for k in ("ok", "boxed", "recovered")} | {"hotpotqa_1000/qa"}
    r = res.report
    assert (r["total"], r["passed"], r["kept_for_sft"], r["rejected"]) == (10, 4, 4, 6)
    assert r["pass_rate"] == 0.4
    assert r["by_source"]["math_1000"]["passed"] == 3 and r["by_source"]["hotpotqa_1000"]["passed"] == 1
    assert r["reasons_primary"] == {"error": 1, "max_steps": 1, "parse_error": 1, "no_answer": 1, "wrong_answer": 2}
    assert r["reasons_any"]["no_answer"] == 2 and r["reasons_any"]["fallback_answer"] == 1
    assert r["passed_with_recovered_exec_error"] == 1
    assert json.loads(json.dumps(r)) == r


def test_cap_per_question_and_smoke_mode():
    trajs = [_t("math_1000/a", s) for s in range(4)] + [_t("math_1000/b", s, final_answer="7") for s in range(2)]
    res = apply_filter(trajs, max_correct_per_question=2)
    assert [(t.sample, t.rejected) for t in res.trajectories if t.id.endswith("/a")] == [
        (0, None), (1, None), (2, "over_cap"), (3, "over_cap")]
    assert len(res.kept) == 2 and res.report["reasons_primary"] == {"wrong_answer": 2, "over_cap": 2}
    smoke = apply_filter([t.model_copy(update={"rejected": None}) for t in trajs], max_correct_per_question=2,
                         keep_all_for_smoke=True)
    assert len(smoke.kept) == 6 and smoke.report["passed"] == 2 and smoke.report["keep_all_for_smoke"]


def test_grading_is_recorded():
    t = grade_trajectory(_t(final_answer="\\frac{8}{2}"))
    assert t.correct is True and json.loads(t.scores)["correct"] is True
    t = grade_trajectory(_t(domain="qa", gold=["The Eiffel Tower"], final_answer="eiffel tower"))
    assert t.correct is True and json.loads(t.scores)["em"] == 1.0


def test_store_atomic_keys_and_dedup(tmp_path):
    store = TrajectoryStore(tmp_path / "s")
    assert store.keys() == set() and store.read() == ([], 0)
    p1 = store.write([_t("q/1", 0), _t("q/2", 0)], tag="w1")
    store.write([_t("q/2", 0, final_answer="dup"), _t("q/3", 1)])
    assert p1.name.startswith("part-") and not list((tmp_path / "s").glob(".tmp-*"))
    fresh = TrajectoryStore(tmp_path / "s")
    assert fresh.keys() == {("q/1", 0), ("q/2", 0), ("q/3", 1)}
    trajs, dups = fresh.read()
    assert [t.key for t in trajs] == [("q/1", 0), ("q/2", 0), ("q/3", 1)] and dups == 1
    assert trajs[1].final_answer == "4"  # the first written copy wins
    assert [t.key for t in fresh.read({("q/3", 1)})[0]] == [("q/3", 1)]
    # a killed writer leaves only a hidden temp file, which readers ignore and clean_tmp removes
    (tmp_path / "s" / ".tmp-part-x.parquet").write_bytes(b"partial")
    assert fresh.keys() == {("q/1", 0), ("q/2", 0), ("q/3", 1)}
    assert fresh.clean_tmp() == 1
    # a damaged finished shard is an error naming the file, not a silent drop
    (tmp_path / "s" / "part-99999999999999999999-bad.parquet").write_bytes(b"garbage")
    with pytest.raises(ShardError, match="part-99999999999999999999-bad.parquet"):
        TrajectoryStore(tmp_path / "s").keys()


def test_store_roundtrip_keeps_every_field(tmp_path):
    t = _t(ftp_cot="cot", ftp_prefix="Thought: x\n\n", tools=["web_search"], correct=True, scores='{"a": 1}',
           steps=[Step(raw_text="r", thought="t", code="c", observation="o", exec_error=True, prompt_tokens=3,
                       completion_tokens=4, gen_s=0.5, exec_s=0.25, sag='{"n": 4}')])
    store = TrajectoryStore(tmp_path)
    path = store.write([t])
    assert store.read()[0] == [t]
    assert pq.read_metadata(path).num_rows == 1
