"""`raydistill solve`: one local episode printed for people or as JSON (scripted student, real sandbox)."""

from __future__ import annotations

import json

import yaml

from raydistill.cli import main


def write_cfg(tmp_path, script):
    cfg = {"run_dir": str(tmp_path / "run"), "student": {"backend": "scripted", "model": "demo", "script": script},
           "agent": {"max_steps": 3}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


SCRIPT = ["Thought: compute\n```py\nx = 2 + 2\nprint(x)\n```<end_code>", "Thought: done\n```py\nfinal_answer(x)\n```"]


def test_solve_json(tmp_path, capsys):
    rc = main(["solve", "--config", write_cfg(tmp_path, SCRIPT), "--json", "What is 2+2?"])
    out = capsys.readouterr()
    assert rc == 0
    row = json.loads(out.out)
    assert row["final_answer"] == "4" and row["question"] == "What is 2+2?" and len(row["steps"]) == 2
    assert row["system_prompt"] == "student" and row["engine"] == "scripted"
    assert "no retrieval index" in out.err  # retrieval on by default, but nothing indexed in this run dir


def test_solve_human_readable_and_override(tmp_path, capsys):
    rc = main(["solve", "--config", write_cfg(tmp_path, SCRIPT), "What is 2+2?", "agent.max_steps=1",
               "retrieval.enabled=false"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "--- step 1" in text and "x = 2 + 2" in text and "Step limit reached" in text
    assert "Final answer:" in text
