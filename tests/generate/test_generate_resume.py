"""Kill the driver of `python -m raydistill generate` with SIGKILL partway, rerun it: every (question, sample)
is in the output exactly once, and the work finished before the kill is not redone."""

from __future__ import annotations

import os
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


def _ray_start_timeout(log: Path) -> bool:
    """Ray's fixed 30 s node-start limit can run out on this shared 2-core box; the run then did nothing and
    is simply started again (which is what resuming means anyway)."""
    return "timed out during startup" in log.read_text()


def _descendants(root: int) -> set[int]:
    """pids of every live process below `root` (Ray's gcs, raylet, workers, sandboxes: all started by this test)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_all(pids: set[int]) -> None:
    """SIGKILL these pids until all are gone; a pid seen dead once is never signalled again (no reuse risk)."""
    pending = set(pids)
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if _alive(p)}
        for p in pending:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)


def test_sigkill_driver_then_resume(tmp_path):
    cfg_path = _write_config(tmp_path)
    cfg = load_config(cfg_path)
    total = len(generate.question_rows(cfg))
    assert total == 24
    store = TrajectoryStore(tmp_path / "run/trajectories/agent")

    for _attempt in range(3):
        proc = _start(cfg_path, tmp_path / "run1.log")
        tree: set[int] = set()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and len(store.shards()) < 4:
            time.sleep(0.2)
        if proc.poll() is None or not _ray_start_timeout(tmp_path / "run1.log"):
            break
    try:
        assert proc.poll() is None, "run finished before it could be killed:\n" + (tmp_path / "run1.log").read_text()
        assert len(store.shards()) >= 4, "no progress:\n" + (tmp_path / "run1.log").read_text()
        tree = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only; its Ray processes notice on their own ...
        proc.wait(30)
        time.sleep(1.0)
    finally:
        _kill_all(tree | _descendants(proc.pid) | {proc.pid})  # ... whatever is left is cleaned up here
    shards_at_kill = {p.name for p in TrajectoryStore(store.dir).shards()}
    done_at_kill = TrajectoryStore(store.dir).keys()
    assert 4 <= len(done_at_kill) < total, f"{len(done_at_kill)} of {total} done at the kill"
    assert not (tmp_path / "run/sft/agent/meta.json").exists()

    for _attempt in range(3):
        proc = _start(cfg_path, tmp_path / "run2.log")
        try:
            rc = proc.wait(400)
        finally:
            _kill_all(_descendants(proc.pid) | {proc.pid})
        if rc == 0 or not _ray_start_timeout(tmp_path / "run2.log"):
            break
    assert rc == 0, (tmp_path / "run2.log").read_text()
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
