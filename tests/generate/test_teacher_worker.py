"""TeacherWorker in-process (it is a plain class; Ray Data only hosts it): durable shards, skip-on-disk for
re-run batches, per-episode failures recorded, and writers of a superseded run refusing to write."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

from raydistill.actors.teacher import STAT_COLUMNS, SupersededError, TeacherWorker, write_run_token
from raydistill.config import load_config
from raydistill.curation import TrajectoryStore

GOOD = "Thinking.\n\nSo <answer>Paris</answer>"


def _rows(n: int) -> pa.Table:
    return pa.Table.from_pylist([{"id": f"hotpotqa_1000/q{i}", "sample": 0, "question": f"Capital of France {i}?",
                                  "gold": ["Paris"], "domain": "qa", "source": "hotpotqa_1000"} for i in range(n)])


def _worker(tmp_path, kind="cot", script=(GOOD,), token=None, **kw) -> TeacherWorker:
    cfg = load_config(None, ["teacher.backend=scripted", "teacher.model=scripted", "retrieval.enabled=false",
                             "generate.flush_interval_s=0", "agent.max_steps=2"])
    cfg.teacher.script = list(script)
    return TeacherWorker(cfg, kind, str(tmp_path / "out"), run_token=token, **kw)


def test_batch_is_durable_and_rerun_skips_done_rows(tmp_path):
    w = _worker(tmp_path)
    out = asyncio.run(w(_rows(3)))
    assert set(out) == set(STAT_COLUMNS) and out["skipped"] == [False] * 3 and out["correct"] == [True] * 3
    store = TrajectoryStore(tmp_path / "out")
    assert len(store.keys()) == 3
    n_shards = len(store.shards())
    # a retried batch (after an actor restart) with one new row: only that row runs
    w2 = _worker(tmp_path)
    out = asyncio.run(w2(_rows(4)))
    assert sorted(out["skipped"]) == [False, True, True, True] and w2.episodes_run == 1
    assert len(store.shards()) == n_shards + 1 and TrajectoryStore(store.dir).count_rows() == 4


def test_episode_failures_are_recorded_not_raised(tmp_path):
    # engine failure on every call (empty script)
    w = _worker(tmp_path, script=[])
    out = asyncio.run(w(_rows(2)))
    assert out["reason"] == ["error", "error"]
    trajs, _ = TrajectoryStore(tmp_path / "out").read()
    assert all("no outputs" in t.error for t in trajs)

    class BrokenPool:  # failure injection: the sandbox pool is unreachable
        async def create(self, tools=None):
            raise ConnectionError("sandbox pool unreachable")

    w = _worker(tmp_path / "b", kind="agent", script=["```py\nprint(1)\n```"], sandbox_pool=BrokenPool())
    out = asyncio.run(w(_rows(2)))
    trajs, _ = TrajectoryStore(tmp_path / "b/out").read()
    # the sandbox is awaited at the first code step (its creation overlaps the first generation), so the failure
    # is that step's recorded sandbox failure
    assert out["reason"] == ["error", "error"]
    assert len(trajs) == 2 and all(t.error == "sandbox failure: ConnectionError: sandbox pool unreachable"
                                   and len(t.steps) == 1 and t.steps[0].exec_error for t in trajs)
    assert all(t.kind == "agent" and t.rejected is None and t.correct is False for t in trajs)


def test_superseded_run_does_not_write(tmp_path):
    token = write_run_token(tmp_path / "out")
    w = _worker(tmp_path, token=token)
    asyncio.run(w(_rows(1)))
    write_run_token(tmp_path / "out")  # a newer run claims the directory
    with pytest.raises(SupersededError):
        asyncio.run(w(_rows(3)))
    assert TrajectoryStore(tmp_path / "out").count_rows() == 1


def test_grading_can_be_left_to_the_filter(tmp_path):
    from raydistill.curation.filter import apply_filter
    from raydistill.stages.generate import Progress

    w = _worker(tmp_path, grade_in_worker=False)
    out = asyncio.run(w(_rows(2)))
    assert out["correct"] == [None, None] and out["reason"] == ["", ""]
    progress = Progress("cot", 2, 0, 3600)
    progress.update(out)
    assert progress.stats()["reasons"] == {"ungraded": 2} and progress.correct == 0
    trajs, _ = TrajectoryStore(tmp_path / "out").read()
    assert all(t.correct is None for t in trajs)
    result = apply_filter(trajs)  # the filter grades what the worker did not
    assert all(t.correct is True for t in trajs) and result.report["passed"] == 2
    assert w.phase_stats()["phases"]["grade"] == 0.0
