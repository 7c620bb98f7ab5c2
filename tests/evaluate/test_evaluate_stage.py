"""`raydistill evaluate` on CPU: all 8 bundled test sets (1 question each), agent / agent_sag / cot / rag_cot, on
Ray Data with a tiny random-weight student, a sandbox pool and a retriever over a small real index; then resume
(nothing redone) and the rendered report. (web_search from pool sandboxes into a retriever is exercised end to
end by tests/serve/test_serve_app.py's scripted student.)"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raydistill.config import load_config
from raydistill.data.loaders import bundled_sets

TEST_SETS = sorted(n for n, p in bundled_sets().items() if p.parent.name == "test")


@pytest.fixture(scope="module")
def evaluated(ray_local, tiny_model_dir, small_index, tmp_path_factory):
    from raydistill.stages import evaluate

    run_dir = tmp_path_factory.mktemp("evalrun")
    cfg = load_config(None, [
        f"run_dir={run_dir}", *small_index, "student.model=tiny:qwen2-tiny",
        "student.max_model_len=2048", f"evaluate.sets={json.dumps(TEST_SETS)}", "evaluate.limit=1",
        "evaluate.modes=[agent, agent_sag, cot, rag_cot]", "evaluate.num_cpus=0.2", "evaluate.batch_size=16",
        "evaluate.cot_max_new_tokens=12",
        "agent.max_steps=2", "agent.max_new_tokens=8", "agent.sag.n=2",
        "sandbox.pool.num_actors=1", "sandbox.pool.num_cpus_per_actor=0.1",
    ])
    summary = evaluate.run(cfg)
    return cfg, summary


def test_all_sets_and_modes_are_graded(evaluated):
    from raydistill.report import read_results

    cfg, summary = evaluated
    assert len(TEST_SETS) == 8
    rows = read_results(cfg.run_path / "eval" / "results")
    modes = ("agent", "agent_sag", "cot", "rag_cot")
    assert len(rows) == 8 * 4 == summary["rows"]
    assert {(r["benchmark"], r["mode"]) for r in rows} == {(b, m) for b in TEST_SETS for m in modes}
    for r in rows:
        assert r["correct"] in (True, False), r  # every row graded
        assert r["model_label"] == "qwen2-tiny" and r["model_size_b"] and r["model_size_b"] < 0.01
        scores = json.loads(r["scores"])
        if r["domain"] == "qa":
            assert {"em", "f1"} <= set(scores)
        if r["mode"] in ("cot", "rag_cot"):
            assert r["kind"] == "cot" and r["num_steps"] <= 1
            assert json.loads(r["sampling"])["passages"] == (2 if r["mode"] == "rag_cot" else 0)
            assert json.loads(r["sampling"])["cot"]["max_tokens"] == 12
        else:
            assert r["kind"] == "agent" and 1 <= r["num_steps"] <= 2 and r["system_prompt"] == "student"
        if r["mode"] == "agent_sag" and not r["error"]:
            assert all(json.loads(s["sag"])["n"] == 2 for s in r["steps"])
        assert (r["failure"] is None) == bool(r["correct"])
    parts = list((cfg.run_path / "eval" / "results").rglob("*.parquet"))
    assert parts and all(pq.read_metadata(p).num_rows > 0 for p in parts)


def test_report_renders(evaluated):
    from matplotlib.image import imread

    cfg, summary = evaluated
    md = (cfg.run_path / "eval" / "report.md").read_text()
    for name in TEST_SETS:
        assert name in md
    for heading in ("## Accuracy (%)", "## Agent behaviour", "## Failure reasons", "## Example trajectories"):
        assert heading in md
    html = (cfg.run_path / "eval" / "report.html").read_text()
    assert "<table>" in html and "plots/accuracy_by_benchmark.png" in html
    img = imread(cfg.run_path / "eval" / "plots" / "accuracy_by_benchmark.png")
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert (cfg.run_path / "eval" / "plots" / "sag_on_off.png").exists()
    assert summary["examples"]
    for ex in summary["examples"]:
        text = Path(ex).read_text()
        assert "## Question" in text and "## Step 1" in text
        assert ex.split("/eval/")[1] in md  # linked from the report


def test_resume_redoes_nothing(evaluated):
    from raydistill.stages import evaluate

    cfg, _ = evaluated
    before = sorted(p.name for p in (cfg.run_path / "eval" / "results").rglob("*.parquet"))
    assert evaluate.is_done(cfg)
    again = evaluate.run(cfg)
    assert all(v.get("ran", 0) == 0 for v in again["runs"].values()), again["runs"]
    assert sorted(p.name for p in (cfg.run_path / "eval" / "results").rglob("*.parquet")) == before
    # one more mode: only its rows run
    cfg2 = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"modes": ["agent", "cot", "agent_sag"],
                                                                             "limit": 2, "sets": ["bamboogle_125"]})})
    assert not evaluate.is_done(cfg2)
    plan = evaluate.plan(cfg2)
    assert sum(len(todo) for _, todo in plan) == 3  # the second bamboogle question, once per mode

