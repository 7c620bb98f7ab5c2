"""Kill the driver of `python -m raydistill generate` with SIGKILL partway, rerun it: every (question, sample)
is in the output exactly once, and the work finished before the kill is not redone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from raydistill.config import load_config
from raydistill.curation import TrajectoryStore
from raydistill.stages import generate

# Each episode: one code step that sleeps (a slow tool), then final_answer - slow enough to kill partway.
SCRIPT = [
    "Thought: work.\n```py\nimport time\ntime.sleep(0.3)\nx = 2 + 2\nprint(x)\n```<end_code>",
    "Thought: done.\n```py\nfinal_answer('Paris')\n```<end_code>",
]


def _write_config(tmp_path: Path) -> Path:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "ray": {"address": "local", "num_cpus": 2},
        "data": {"train_sets": ["hotpotqa_1000"], "limit": 12},
        "teacher": {"backend": "scripted", "model": "scripted", "script": SCRIPT},
        "student": {"backend": "transformers", "model": "tiny:qwen2-tiny"},
        "agent": {"max_steps": 3},
        "retrieval": {"enabled": False},
        "sandbox": {"pool": {"num_actors": 1, "num_cpus_per_actor": 0.25}},
        "generate": {"kinds": ["agent"], "samples_per_question": 2, "batch_size": 2, "episodes_per_worker": 2,
                     "flush_interval_s": 0, "worker_num_cpus": 0.25, "progress_interval_s": 1},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _start(cfg_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "raydistill", "generate", "--config", str(cfg_path)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _session_pids(session: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if session in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _kill_group(proc: subprocess.Popen, log: Path) -> None:
    """Everything the driver started (all started by this test): its process group (gcs, raylet) and the
    Ray workers of its session (they run in process groups of their own), found by the session dir name."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    m = re.search(r"/(session_[0-9_\-]+)", log.read_text())
    if not m:
        return
    deadline = time.monotonic() + 30
    while (pids := _session_pids(m.group(1))) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def test_sigkill_driver_then_resume(tmp_path):
    cfg_path = _write_config(tmp_path)
    cfg = load_config(cfg_path)
    total = len(generate.question_rows(cfg))
    assert total == 24
    store = TrajectoryStore(tmp_path / "run/trajectories/agent")

    proc = _start(cfg_path, tmp_path / "run1.log")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and len(store.shards()) < 4:
            time.sleep(0.2)
        assert proc.poll() is None, "run finished before it could be killed:\n" + (tmp_path / "run1.log").read_text()
        assert len(store.shards()) >= 4, "no progress:\n" + (tmp_path / "run1.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        time.sleep(1.0)
    finally:
        _kill_group(proc, tmp_path / "run1.log")
    shards_at_kill = {p.name for p in TrajectoryStore(store.dir).shards()}
    done_at_kill = TrajectoryStore(store.dir).keys()
    assert 4 <= len(done_at_kill) < total, f"{len(done_at_kill)} of {total} done at the kill"
    assert not (tmp_path / "run/sft/agent/meta.json").exists()

    proc = _start(cfg_path, tmp_path / "run2.log")
    try:
        assert proc.wait(400) == 0, (tmp_path / "run2.log").read_text()
    finally:
        _kill_group(proc, tmp_path / "run2.log")
    log2 = (tmp_path / "run2.log").read_text()
    assert f"agent: {total} episodes, {len(done_at_kill)} already done, {total - len(done_at_kill)} to run" in log2

    final = TrajectoryStore(store.dir)
    trajs, dups = final.read()
    assert dups == 0 and final.count_rows() == total, "a row was duplicated on disk"
    assert sorted(t.key for t in trajs) == sorted((r["id"], r["sample"]) for r in generate.question_rows(cfg))
    # the shards finished before the kill are kept as they were; the resumed run only added new ones
    assert shards_at_kill <= {p.name for p in final.shards()}
    assert (tmp_path / "run/filter/agent/report.json").exists()
    assert (tmp_path / "run/sft/agent/meta.json").exists()
    assert generate.is_done(cfg)
