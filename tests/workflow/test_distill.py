"""The distill job's own logic: fingerprints, the CoT branch switch, manifest, skip/resume, changed configs.

Stage modules here are small stand-ins that follow the stage contract (write their output under run_dir,
`is_done` checks it for the config they were given), so these tests exercise the orchestration quickly;
tests/workflow/test_e2e_job.py runs the real stages under `ray job submit`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from raydistill.config import load_config
from raydistill.config.distill import DistillConfig
from raydistill.stages import distill

REPO = Path(__file__).resolve().parents[2]
STAGE_DIR = {"index": "index", "generate": "sft", "train": "train", "evaluate": "eval"}


def _cfg(run_dir: Path, *overrides: str):
    return load_config(REPO / "configs" / "local.yaml", [f"run_dir={run_dir}", *overrides])


def _stand_in(name: str, calls: list[str], fail: dict[str, bool]):
    """A contract-following stage: output = <run_dir>/<dir>/done.json holding the config it was made with."""
    mod = types.ModuleType(f"raydistill.stages.{name}")

    def key(cfg) -> str:
        inputs = distill.stage_inputs(cfg, name)
        if name == "generate":
            # Like the real generate stage (generation_settings), key on the WHOLE sandbox section, pool included.
            inputs = {**inputs, "sandbox_all": cfg.sandbox.model_dump(mode="json")}
        return json.dumps(inputs, sort_keys=True)

    def out(cfg) -> Path:
        return cfg.run_path / STAGE_DIR[name] / "done.json"

    def run(cfg):
        calls.append(name)
        if fail.get(name):
            raise RuntimeError(f"{name} exploded")
        out(cfg).parent.mkdir(parents=True, exist_ok=True)
        out(cfg).write_text(json.dumps({"key": key(cfg)}))
        return {"stage": name, "path": str(out(cfg))}

    def is_done(cfg) -> bool:
        p = out(cfg)
        return p.exists() and json.loads(p.read_text())["key"] == key(cfg)

    mod.run, mod.is_done = run, is_done
    if name == "evaluate":
        def run_eval(cfg, _run=run):
            s = _run(cfg)
            (cfg.run_path / "eval" / "report.md").write_text("# report\n")
            return {**s, "report": str(cfg.run_path / "eval" / "report.md")}
        mod.run = run_eval
    return mod


@pytest.fixture
def stages(monkeypatch):
    calls: list[str] = []
    fail: dict[str, bool] = {}
    for name in ("index", "generate", "train", "evaluate"):
        monkeypatch.setitem(sys.modules, f"raydistill.stages.{name}", _stand_in(name, calls, fail))
    return calls, fail


# ------------------------------------------------------------------------------------------- pure logic


def test_fingerprints_ignore_resources_and_chain_downstream(tmp_path):
    base = distill.fingerprints(_cfg(tmp_path))
    assert base == distill.fingerprints(_cfg(tmp_path, "train.num_workers=1", "generate.num_workers=3",
                                             "teacher.max_batch_size=4", "generate.kinds=[agent]"))
    teacher = distill.fingerprints(_cfg(tmp_path, "teacher.model=tiny:qwen2-tiny"))
    assert teacher["index"] == base["index"]
    assert all(teacher[s] != base[s] for s in ("generate", "train", "evaluate"))
    lr = distill.fingerprints(_cfg(tmp_path, "train.lr=0.5"))
    assert [s for s in base if lr[s] != base[s]] == ["train", "evaluate"]
    ev = distill.fingerprints(_cfg(tmp_path, "evaluate.limit=1"))
    assert [s for s in base if ev[s] != base[s]] == ["evaluate"]
    corpus = distill.fingerprints(_cfg(tmp_path, "retrieval.index_type=hnsw"))
    assert all(corpus[s] != base[s] for s in base)
    assert distill.fingerprints(_cfg(tmp_path, "retrieval.enabled=false"))["index"] == "disabled"


# Settings that change only how fast / where a stage runs, and some that change what it writes.
RESOURCE_ONLY = ("sandbox.pool.num_actors=5", "sandbox.pool.num_cpus_per_actor=0.5", "sandbox.warm_sandboxes=0",
                 "sandbox.pool.idle_timeout_s=60", "generate.progress_interval_s=1", "generate.flush_interval_s=5",
                 "retrieval.num_cpus=1", "retrieval.cache_size=0", "teacher.num_cpus=1", "teacher.cpu_threads=1",
                 "student.max_lora_rank=16", "train.cpus_per_worker=0.25", "train.ingest=driver",
                 "evaluate.num_cpus=0.5", "evaluate.concurrency=2", "ray.num_cpus=1")
OUTPUT_CHANGING = {"sandbox.limits.step_timeout_s=5": "generate", "agent.max_steps=3": "generate",
                   "retrieval.refine_factor=0": "generate", "retrieval.cpu_bf16=true": "index",
                   "sft.max_length=1024": "generate", "teacher.load_format=dummy": "generate",
                   "train.max_steps=1": "train", "evaluate.examples_per_group=1": "evaluate"}


def test_fingerprints_ignore_resource_only_keys_and_include_output_keys(tmp_path):
    base = distill.fingerprints(_cfg(tmp_path))
    assert distill.fingerprints(_cfg(tmp_path, *RESOURCE_ONLY)) == base
    order = list(base)
    for override, first in OUTPUT_CHANGING.items():
        fps = distill.fingerprints(_cfg(tmp_path, override))
        changed = [s for s in order if fps[s] != base[s]]
        assert changed and changed[0] == first, (override, changed)


def test_resource_only_change_skips_everything_output_change_stops(tmp_path, stages, ray_local):
    calls, _ = stages
    distill.run(_cfg(tmp_path / "run"))
    calls.clear()
    # The generate stand-in keys on the whole sandbox section (as the real stage does): a bigger sandbox pool
    # alone must not redo it; its is_done holds under the resources recorded in the manifest.
    bigger = _cfg(tmp_path / "run", *RESOURCE_ONLY)
    assert distill.is_done(bigger)
    distill.run(bigger)
    assert calls == []
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {s["action"] for s in m["jobs"][-1]["stages"].values()} == {"skipped"}
    assert m["stages"]["generate"]["config"]["sandbox"]["pool"]["num_actors"] == 2  # as made, not as skipped
    with pytest.raises(distill.ConfigChanged, match=r"sandbox\.limits\.step_timeout_s: 30\.0 -> 5\.0"):
        distill.run(_cfg(tmp_path / "run", "sandbox.limits.step_timeout_s=5"))
    assert calls == []
    distill.run(_cfg(tmp_path / "run", "sandbox.limits.step_timeout_s=5"), DistillConfig(on_config_change="rerun"))
    assert calls == ["generate", "train", "evaluate"]


def test_cot_branch_switch(tmp_path):
    cfg = _cfg(tmp_path, "generate.kinds=[agent]", "train.kinds=[agent]", "evaluate.modes=[agent]")
    on = distill.effective_config(cfg, DistillConfig(cot_branch=True))
    assert on.generate.kinds == ["agent", "cot"] and on.train.kinds == ["agent", "cot"]
    assert "cot" in on.evaluate.modes
    off = distill.effective_config(_cfg(tmp_path), DistillConfig(cot_branch=False))
    assert off.generate.kinds == ["agent"] and off.train.kinds == ["agent"]
    assert not {"cot", "rag_cot"} & set(off.evaluate.modes)
    assert distill.effective_config(cfg, DistillConfig()) is cfg
    only_cot = _cfg(tmp_path, "generate.kinds=[cot]")
    with pytest.raises(distill.DistillError, match="generate.kinds empty"):
        distill.effective_config(only_cot, DistillConfig(cot_branch=False))


def test_distill_config_orders_and_rejects(tmp_path):
    cfg = _cfg(tmp_path, "distill.cot_branch=false", "distill.stages=[train,generate]")
    assert distill.distill_section(cfg) == DistillConfig(cot_branch=False, stages=["generate", "train"])
    assert DistillConfig(stages=["train", "generate"]).stages == ["generate", "train"]
    with pytest.raises(ValueError, match="listed twice"):
        DistillConfig(stages=["train", "train"])
    with pytest.raises(ValueError):
        DistillConfig(stages=["deploy"])


def test_config_diff_names_keys():
    assert distill.config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 4}}) == [
        "a.c: 2 -> 3", "a.d: <unset> -> 4"]


def test_run_dir_lock_is_exclusive(tmp_path):
    with (distill.run_dir_lock(tmp_path), pytest.raises(distill.DistillError, match="another distill job"),
          distill.run_dir_lock(tmp_path)):
        pass
    with distill.run_dir_lock(tmp_path):  # released again
        pass


# ---------------------------------------------------------------------------------------- orchestration


def test_runs_all_then_skips_all_and_records_manifest(tmp_path, stages, ray_local, capsys):
    calls, _ = stages
    cfg = _cfg(tmp_path / "run")
    first = distill.run(cfg)
    assert calls == ["index", "generate", "train", "evaluate"]
    assert first["report"] == str(cfg.run_path / "eval" / "report.md")
    out = capsys.readouterr().out
    assert "[distill] 2/4 generate: running" in out and "[distill] report:" in out

    manifest = json.loads((cfg.run_path / "manifest.json").read_text())
    assert manifest["config"]["run_dir"] == str(tmp_path / "run")
    assert manifest["versions"]["ray"] and manifest["versions"]["python"]
    for stage in ("index", "generate", "train", "evaluate"):
        rec = manifest["stages"][stage]
        assert rec["status"] == "done" and rec["seconds"] >= 0 and rec["fingerprint"]
    assert manifest["jobs"][-1]["status"] == "succeeded"
    assert manifest["jobs"][-1]["cluster"]["resources"]["CPU"] > 0
    assert manifest["report"] == first["report"]

    calls.clear()
    distill.run(cfg)
    assert calls == []
    manifest = json.loads((cfg.run_path / "manifest.json").read_text())
    assert len(manifest["jobs"]) == 2
    assert {s["action"] for s in manifest["jobs"][-1]["stages"].values()} == {"skipped"}
    assert "cluster" not in manifest["jobs"][-1], "a finished run should not even connect to Ray"
    assert distill.is_done(cfg)
    assert [r["action"] for r in distill.plan(cfg)] == ["skip"] * 4


def test_failed_stage_is_recorded_and_resume_continues_there(tmp_path, stages, ray_local):
    calls, fail = stages
    cfg = _cfg(tmp_path / "run")
    fail["train"] = True
    with pytest.raises(RuntimeError, match="train exploded"):
        distill.run(cfg)
    manifest = json.loads((cfg.run_path / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "failed"
    assert "train exploded" in manifest["stages"]["train"]["error"]
    assert manifest["jobs"][-1]["status"] == "failed"
    assert "evaluate" not in manifest["stages"]

    calls.clear()
    fail.clear()
    distill.run(cfg)
    assert calls == ["train", "evaluate"]


def test_killed_job_is_marked_interrupted_and_its_stage_redone(tmp_path, stages, ray_local):
    calls, _ = stages
    cfg = _cfg(tmp_path / "run")
    distill.run(cfg, DistillConfig(stages=["index"]))
    fps = distill.fingerprints(cfg)
    m = json.loads((cfg.run_path / "manifest.json").read_text())
    # What a SIGKILLed job leaves behind: itself and its stage still "running".
    m["jobs"].append({"status": "running", "stages": {}})
    m["stages"]["generate"] = {"status": "running", "fingerprint": fps["generate"]}
    (cfg.run_path / "manifest.json").write_text(json.dumps(m))
    calls.clear()
    distill.run(cfg)
    m = json.loads((cfg.run_path / "manifest.json").read_text())
    assert [j["status"] for j in m["jobs"]] == ["succeeded", "interrupted", "succeeded"]
    assert calls == ["generate", "train", "evaluate"]


def test_changed_config_stops_or_reruns_downstream(tmp_path, stages, ray_local):
    calls, _ = stages
    distill.run(_cfg(tmp_path / "run"))
    changed = _cfg(tmp_path / "run", "train.lr=0.5")
    with pytest.raises(distill.ConfigChanged, match=r"train\.lr: 0\.001 -> 0\.5"):
        distill.run(changed)

    calls.clear()
    distill.run(changed, DistillConfig(on_config_change="rerun"))
    assert calls == ["train", "evaluate"]
    stale = sorted(p.name for p in (tmp_path / "run").iterdir() if ".stale-" in p.name)
    assert [n.split(".stale-")[0] for n in stale] == ["eval", "train"]
    assert (tmp_path / "run" / "sft" / "done.json").exists()  # upstream untouched


def test_stage_subset_needs_upstream_done(tmp_path, stages, ray_local):
    calls, _ = stages
    cfg = _cfg(tmp_path / "run")
    with pytest.raises(distill.DistillError, match="need.*generate"):
        distill.run(cfg, DistillConfig(stages=["train"]))
    assert calls == []  # index is not needed by train directly, but generate is: stop before doing anything
    distill.run(cfg, DistillConfig(stages=["index", "generate"]))
    assert calls == ["index", "generate"]
    manifest = json.loads((cfg.run_path / "manifest.json").read_text())
    assert manifest["jobs"][-1]["stages"]["train"]["action"] == "not-selected"


def test_cli_plan_and_bad_flags(tmp_path):
    run = subprocess.run([sys.executable, "workflows/distill.py", "--config", "configs/local.yaml", "--plan",
                          f"run_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [ln.split() for ln in run.stdout.splitlines()]
    assert [r[0] for r in rows] == ["index", "generate", "train", "evaluate"]
    bad = subprocess.run([sys.executable, "workflows/distill.py", "--config", "configs/local.yaml", "--plan",
                          "--stages", "generate,deploy"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown stage(s) ['deploy']" in bad.stderr
