"""The generate stage on a real local Ray: Ray Data over teacher actors, durable shards, filter, SFT data.

Scripted engine where exact model text matters (malformed output, known answers); everything else is real
(Ray Data actor pool, Parquet shards, grading, the student's tokenizer).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import ray.cloudpickle

from raydistill.actors.teacher import TeacherWorker
from raydistill.config import load_config
from raydistill.curation import TrajectoryStore, read_table
from raydistill.sft import read_dataset, read_meta
from raydistill.stages import generate

# Ray workers cannot import this test module by name: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

GOOD_COT = "Two plus two.\n\nSo the answer is <answer>\\boxed{4}</answer>"


def _cfg(tmp_path: Path, *overrides: str, script: list[str] | None = None, sets: str = "[math_1000,hotpotqa_1000]"):
    base = [
        f"run_dir={tmp_path / 'run'}", f"data.train_sets={sets}", "data.limit=3",
        "teacher.backend=scripted", "teacher.model=scripted", "student.model=tiny:qwen2-tiny",
        "generate.kinds=[cot]", "generate.batch_size=2", "generate.episodes_per_worker=4",
        "generate.flush_interval_s=0", "generate.worker_num_cpus=0.25", "generate.progress_interval_s=1",
        "retrieval.enabled=false", "sandbox.pool.num_actors=1",
    ]
    cfg = load_config(None, base + list(overrides))
    cfg.teacher.script = [GOOD_COT] if script is None else script
    return cfg


def test_cot_end_to_end_and_rerun_skips(ray_local, tmp_path):
    cfg = _cfg(tmp_path, "generate.samples_per_question=2", "generate.max_correct_per_question=1", "data.limit=2")
    # the scripted teacher gives every question the first QA question's gold: exactly that one is correct
    first_qa = next(r for r in generate.question_rows(cfg) if r["source"] == "hotpotqa_1000")
    cfg.teacher.script = [f"Let me recall.\n\nIt is <answer>{first_qa['gold'][0]}</answer>"]
    out = generate.run(cfg)
    s = out["kinds"]["cot"]
    assert s["generation"]["total"] == 8 and s["generation"]["episodes"] == 8
    trajs, dups = TrajectoryStore(tmp_path / "run/trajectories/cot").read()
    assert dups == 0 and sorted(t.key for t in trajs) == sorted(
        (r["id"], r["sample"]) for r in generate.question_rows(cfg))
    report = json.loads((tmp_path / "run/filter/cot/report.json").read_text())
    # math golds are not 4 except by chance; every QA answer "\boxed{4}" is wrong
    assert report["total"] == 8 and report["by_source"]["hotpotqa_1000"]["correct"] == 2
    assert report["passed"] == 1 and report["reasons_primary"] == {"wrong_answer": 6, "over_cap": 1}
    graded = {t.key: t for t in read_table(tmp_path / "run/filter/cot/trajectories.parquet")}
    assert graded[(first_qa["id"], 0)].rejected is None and graded[(first_qa["id"], 1)].rejected == "over_cap"
    assert all(t.correct is not None and t.scores for t in graded.values())
    meta = read_meta(tmp_path / "run/sft/cot")
    assert meta["count"] == report["kept_for_sft"] == 1
    assert read_dataset(tmp_path / "run/sft/cot").column("id").to_pylist() == [first_qa["id"]]
    assert generate.is_done(cfg)
    # a second run does nothing new
    again = generate.run(cfg)
    assert again["kinds"]["cot"]["generation"]["episodes"] == 0
    assert again["kinds"]["cot"]["generation"]["already_done"] == 8
    # more questions: only the new ones run
    more = _cfg(tmp_path, "generate.samples_per_question=2", "data.limit=3", script=cfg.teacher.script)
    assert not generate.is_done(more)
    assert generate.run(more)["kinds"]["cot"]["generation"]["episodes"] == 4
    assert TrajectoryStore(tmp_path / "run/trajectories/cot").count_rows() == 12


def test_smoke_mode_keeps_everything_and_sft_is_real(ray_local, tmp_path):
    cfg = _cfg(tmp_path, "generate.keep_all_for_smoke=true", script=["No idea, sorry."])
    generate.run(cfg)
    report = json.loads((tmp_path / "run/filter/cot/report.json").read_text())
    # malformed output (no <answer>): recorded as failed, still kept for the smoke run's SFT data
    assert report["passed"] == 0 and report["reasons_primary"] == {"no_answer": 6}
    assert report["kept_for_sft"] == 6 and report["keep_all_for_smoke"] is True
    table = read_dataset(tmp_path / "run/sft/cot")
    assert table.num_rows == 6 and min(table.column("num_loss_tokens").to_pylist()) > 0


def test_changed_settings_are_refused_or_moved_aside(ray_local, tmp_path):
    generate.run(_cfg(tmp_path, sets="[hotpotqa_1000]"))
    changed = _cfg(tmp_path, "agent.temperature=0.5", sets="[hotpotqa_1000]")
    with pytest.raises(generate.StageError, match=r"agent.temperature: 0.0 -> 0.5"):
        generate.run(changed)
    # resource settings do not count as a change
    assert generate.changed_settings(_cfg(tmp_path, "generate.num_workers=2", "teacher.num_cpus=0.5"), "cot") == []
    rerun = _cfg(tmp_path, "agent.temperature=0.5", "generate.on_config_change=rerun", sets="[hotpotqa_1000]")
    assert generate.run(rerun)["kinds"]["cot"]["generation"]["episodes"] == 3
    assert len(list((tmp_path / "run/trajectories").glob("cot.stale-*"))) == 1


class DyingTeacher(TeacherWorker):
    """Kills its own process once (first life only), right after its 3rd episode is safely on disk."""

    def _log(self, what: str, row_or_traj) -> None:
        key = (row_or_traj["id"], row_or_traj["sample"]) if isinstance(row_or_traj, dict) else row_or_traj.key
        with open(self.store.dir.parent / "events.log", "a") as f:
            f.write(json.dumps([what, os.getpid(), *key]) + "\n")

    async def run_one(self, row):
        self._log("start", row)
        await asyncio.sleep(0.3)  # pace the instant scripted engine so the death lands mid-batch
        return await super().run_one(row)

    async def _add(self, traj):
        await super()._add(traj)  # flush_interval_s=0: on disk when this returns
        self._log("durable", traj)
        self.durable = getattr(self, "durable", 0) + 1
        marker = self.store.dir.parent / "died"
        if not marker.exists() and self.durable >= 3:
            marker.write_text(str(os.getpid()))
            os._exit(1)


def test_teacher_actor_death_loses_no_finished_work(ray_local, tmp_path):
    cfg = _cfg(tmp_path, "data.limit=8", "generate.episodes_per_worker=2", "generate.batch_size=4",
               sets="[hotpotqa_1000]")
    out = generate.run(cfg, worker_cls=DyingTeacher)
    events = [json.loads(x) for x in (tmp_path / "run/trajectories/events.log").read_text().splitlines()]
    dead_pid = int((tmp_path / "run/trajectories/died").read_text())
    assert {pid for _, pid, *_ in events} - {dead_pid}, "the actor was not restarted"
    durable_before = {(q, s) for what, pid, q, s in events if what == "durable" and pid == dead_pid}
    assert 3 <= len(durable_before) < 8
    restarted_starts = [(q, s) for what, pid, q, s in events if what == "start" and pid != dead_pid]
    assert not durable_before & set(restarted_starts), "finished work was redone"
    trajs, dups = TrajectoryStore(tmp_path / "run/trajectories/cot").read()
    assert dups == 0 and len(trajs) == 8 == out["kinds"]["cot"]["generation"]["total"]


def test_agent_malformed_output_and_engine_failure_are_recorded(ray_local, tmp_path):
    # unparseable model text every step: each episode is a recorded failure, the batch does not crash
    cfg = _cfg(tmp_path, "generate.kinds=[agent]", "agent.max_steps=2", sets="[hotpotqa_1000]",
               script=["I will not write code.", "```py\nx = (\n```<end_code>"])
    out = generate.run(cfg)
    assert out["kinds"]["agent"]["generation"]["episodes"] == 3
    trajs = read_table(tmp_path / "run/filter/agent/trajectories.parquet")
    assert len(trajs) == 3
    for t in trajs:
        assert t.error is None and t.max_steps_reached and all(s.parse_error for s in t.steps)
        assert t.rejected.startswith("max_steps") and "parse_error" in t.rejected
    report = json.loads((tmp_path / "run/filter/agent/report.json").read_text())
    assert report["passed"] == 0 and report["reasons_primary"] == {"max_steps": 3}
    assert read_meta(tmp_path / "run/sft/agent")["count"] == 0
    # an engine that fails every call: recorded as Trajectory.error, still one row per question
    cfg2 = _cfg(tmp_path / "b", "generate.kinds=[agent]", sets="[hotpotqa_1000]", script=[])
    generate.run(cfg2)
    trajs = read_table(tmp_path / "b/run/filter/agent/trajectories.parquet")
    assert len(trajs) == 3 and all(t.error and "no outputs" in t.error and t.rejected.startswith("error")
                                   for t in trajs)
