"""Grading of results and the report, without Ray: real trajectories, real graders, real matplotlib output."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from raydistill.agent.trajectory import Step, Trajectory
from raydistill.report import done_keys, failure_reason, read_results, result_row, to_table, write_report
from raydistill.stages.evaluate import PartWriter, grade_result

CODE = "Thought: compute\n```py\nfinal_answer({a!r})\n```<end_code>"


def _traj(qid: str, domain: str, gold: str, answer: str | None, *, steps: int = 1, sag: bool = False,
          error: str | None = None, max_steps: bool = False, search: bool = False) -> Trajectory:
    code = (f"r = web_search({qid!r})\n" if search else "") + f"final_answer({answer!r})"
    vote = json.dumps({"n": 4, "survived": 3, "groups": [[3, ["", "", answer], -1.5, [0, 1, 3]]], "chosen": 0})
    st = [Step(raw_text=CODE.format(a=answer), code=code, observation="Observation:\nExecution logs:\n",
               is_final=i == steps - 1 and answer is not None, sag=vote if sag else None) for i in range(steps)]
    return Trajectory(id=qid, domain=domain, question=f"question {qid} | with a pipe", gold=[gold], steps=st,
                      final_answer=answer, error=error, max_steps_reached=max_steps, system_prompt="student")


def _graded(t: Trajectory) -> Trajectory:
    return asyncio.run(grade_result(t))


def test_grading_rules():
    assert _graded(_traj("m1", "math", "42", "\\boxed{42}")).correct is True
    assert _graded(_traj("m2", "math", "13138981", "13138980")).correct is False  # integer golds: exact
    assert _graded(_traj("m3", "math", "\\frac{1}{2}", "0.5")).correct is True
    qa = _graded(_traj("q1", "qa", "The Eiffel Tower", "eiffel tower"))
    assert qa.correct is True and json.loads(qa.scores)["em"] == 1.0
    partial = _graded(_traj("q2", "qa", "Barack Obama", "Obama"))
    s = json.loads(partial.scores)
    assert partial.correct is False and 0 < s["f1"] < 1
    none = _graded(_traj("q3", "qa", "Paris", None))
    assert none.correct is False and failure_reason(none) == "no_answer"
    nogold = Trajectory(id="x", question="q", gold=[], final_answer="1")
    assert _graded(nogold).correct is None


def test_failure_reasons_order():
    assert failure_reason(_graded(_traj("a", "qa", "x", "y", error="EngineError: boom"))) == "error"
    assert failure_reason(_graded(_traj("b", "qa", "x", "y", max_steps=True))) == "max_steps_reached"
    assert failure_reason(_graded(_traj("c", "qa", "x", "y"))) == "wrong_answer"
    assert failure_reason(_graded(_traj("d", "qa", "x", "x"))) is None


def _rows() -> list[dict]:
    rows = []
    for label, size, good in (("student-0.5b", 0.5, 1), ("student-1.5b", 1.5, 2)):
        for mode in ("agent", "agent_sag", "cot"):
            bonus = 1 if mode == "agent_sag" else 0
            for bench, domain, gold in (("hotpotqa_500", "qa", "Paris"), ("math_500", "math", "7"),
                                        ("aime_90", "math", "204")):
                for i in range(3):
                    answer = gold if i < min(3, good + bonus) else ("wrong | answer" if i % 2 else None)
                    t = _graded(_traj(f"{bench}/{i}", domain, gold, answer, steps=1 if mode == "cot" else 2,
                                      sag=mode == "agent_sag", search=domain == "qa" and mode != "cot",
                                      max_steps=answer is None and mode != "cot"))
                    if mode == "cot":
                        t.kind = "cot"
                    rows.append(result_row(t, model_label=label, mode=mode, benchmark=bench, adapter=None,
                                           model_size_b=size))
    return rows


def test_report_tables_plots_and_examples(tmp_path):
    rows = _rows()
    to_table(rows)  # schema holds every row
    out = write_report(rows, tmp_path, examples_per_group=2)
    md = (tmp_path / "report.md").read_text()
    # student-1.5b agent: 2/3 on every benchmark -> 66.7; its sag run 3/3 -> 100.0
    line = next(x for x in md.splitlines() if x.startswith("| student-1.5b | 1.5 | agent |"))
    assert line.count("66.7 (2/3)") == 3
    line = next(x for x in md.splitlines() if x.startswith("| student-1.5b | 1.5 | agent_sag |"))
    assert line.count("100.0 (3/3)") == 3
    beh = next(x for x in md.splitlines() if x.startswith("| student-0.5b | agent_sag | 9 |"))
    assert "2.00" in beh and "54/72" in beh  # avg steps; sag survivors: 3 of 4 per step, 2 steps x 9 episodes
    failures = md.split("## Failure reasons")[1]
    fail = next(x for x in failures.splitlines() if x.startswith("| student-0.5b | agent |"))
    assert fail.split("|")[3].strip() == "3"  # correct count (1 per benchmark)
    names = {p.split("/")[-1] for p in out["plots"]}
    assert names == {"accuracy_by_benchmark.png", "accuracy_vs_size.png", "sag_on_off.png"}
    for p in out["plots"]:
        img = imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.01  # not blank
    assert len(out["examples"]) == 2 * 3 * 2
    for p in out["examples"]:
        assert p.split(str(tmp_path) + "/")[1] in md
    one = next(p for p in out["examples"] if "agent_sag" in p)
    assert "sag vote: 3/4 candidates survived" in Path(one).read_text()
    html = (tmp_path / "report.html").read_text()
    assert html.count("<table>") >= 4 and "accuracy_vs_size.png" in html


def test_results_parts_roundtrip_and_resume_keys(tmp_path):
    rows = _rows()
    w = PartWriter(tmp_path)
    paths = w.write(rows[:10])
    w.write(rows[5:20])  # overlapping rows: the later part wins, keys are unique
    assert paths and all(p.suffix == ".parquet" for p in paths)
    back = read_results(tmp_path)
    assert len(back) == 20
    assert done_keys(tmp_path) == {(r["model_label"], r["mode"], r["id"]) for r in rows[:20]}
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_refuses_empty(tmp_path):
    with pytest.raises(ValueError, match="no evaluation results"):
        write_report([], tmp_path)
