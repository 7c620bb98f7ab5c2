"""CPU placement of a vLLM engine core and its frontend, on real processes (vLLM itself is GPU-only: the
engine core here is a Python process carrying vLLM's process title)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from raydistill import procfs
from raydistill.engines import cpu_pinning
from raydistill.engines.cpu_pinning import engine_core_pids, pin_engine, plan, shared_cpus

THREADS = "import threading, time\n[threading.Thread(target=time.sleep, args=(60,), daemon=True).start() for _ in range(3)]\n"


def test_plan_takes_a_pair_per_gpu_slot_from_the_top_and_leaves_most_cpus_shared():
    assert plan(range(16), 0) == (15, 14)
    assert plan(range(16), 1) == (13, 12)
    assert plan(range(16), 3) == (9, 8)
    assert plan(range(16), 4) is None  # 10 of 16 reserved: too many
    assert plan([0, 2, 4, 6, 8, 10], 0) == (10, 8)  # the allowed set, not CPU numbers
    assert plan(range(4), 0) == (3, 2)
    assert plan(range(3), 0) is None and plan(range(2), 0) is None


def spawn_frontend(cores: int = 1) -> subprocess.Popen:
    """A frontend process with threads whose children are titled like vLLM's engine core (threads too)."""
    child = THREADS + "time.sleep(60)\n"
    code = (THREADS + "import subprocess, sys\n"
            + f"for _ in range({cores}):\n    subprocess.Popen([sys.executable, '-c', {child!r}, 'VLLM::EngineCore'])\n"
            + "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while len(engine_core_pids(p.pid)) < cores and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the children's threads started
    return p


def stop(p: subprocess.Popen) -> None:
    for c in procfs.descendants(p.pid):
        subprocess.run(["kill", "-9", str(c)], check=False)
    p.kill()
    p.wait()


@pytest.fixture
def frontend():
    p = spawn_frontend()
    yield p
    stop(p)


def affinities(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_pin_engine_moves_every_thread_of_the_engine_core_and_of_its_frontend(frontend, monkeypatch):
    [core] = engine_core_pids(frontend.pid)
    ec, fe = sorted(os.sched_getaffinity(0))[-1], sorted(os.sched_getaffinity(0))[-2]
    monkeypatch.setattr(cpu_pinning, "plan", lambda allowed, slot: (ec, fe))  # this box may have 2 CPUs
    info = pin_engine(frontend.pid, slot=0)
    assert info["pinned"] and info["engine_core_pids"] == [core], info
    assert affinities(core) == {frozenset({ec})} and len(os.listdir(f"/proc/{core}/task")) >= 4
    assert affinities(frontend.pid) == {frozenset({fe})}
    assert info["threads"] == len(os.listdir(f"/proc/{core}/task")) + len(os.listdir(f"/proc/{frontend.pid}/task"))
    assert cpu_pinning.ENV not in os.environ  # published only in the frontend's own process


def test_pin_engine_says_why_it_did_not_pin(frontend, monkeypatch):
    if plan(os.sched_getaffinity(0), 0) is None:
        info = pin_engine(frontend.pid, slot=0)
        assert not info["pinned"] and "too few" in info["why"], info
    info = pin_engine(os.getpid(), slot=0)  # no engine core under this process
    assert not info["pinned"]
    monkeypatch.setattr(cpu_pinning, "plan", lambda allowed, slot: (0, 0))
    two = spawn_frontend(cores=2)
    try:
        info = pin_engine(two.pid, slot=0)
        assert not info["pinned"] and "data parallel" in info["why"], info
    finally:
        stop(two)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert cpu_pinning.gpu_slot() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    assert cpu_pinning.gpu_slot() == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_an_engine_sharing_a_gpu_slot_takes_the_next_free_pair(monkeypatch):
    """Two engines on one GPU (fractional num_gpus) get the same slot; the second must not pile onto the
    first one's CPUs."""
    a, b = sorted(os.sched_getaffinity(0))[-2:]
    pairs = {0: (b, a), 1: (a, b)}  # slot 1 overlaps slot 0 (this box has 2 CPUs); slot 2: none left
    monkeypatch.setattr(cpu_pinning, "plan", lambda allowed, slot: pairs.get(slot))
    one, two = spawn_frontend(), spawn_frontend()
    try:
        assert pin_engine(one.pid, slot=0)["pinned"]
        info = pin_engine(two.pid, slot=0)
        assert not info["pinned"] and f"CPUs {sorted({a, b})} pinned by other engines" in info["why"], info
        assert affinities(engine_core_pids(two.pid)[0]) != {frozenset({b})}
        pairs[1] = (b + 1, b + 2)  # a free pair at the next slot is taken (any CPU ids: plan is faked)
        monkeypatch.setattr(cpu_pinning, "set_affinity", lambda pid, cpus: 1)
        info = pin_engine(two.pid, slot=0)
        assert info["pinned"] and info["engine_core_cpu"] == b + 1, info
    finally:
        stop(one)
        stop(two)


def test_shared_cpus_leave_out_the_engines(monkeypatch):
    monkeypatch.delenv(cpu_pinning.ENV, raising=False)
    assert shared_cpus() is None
    n = os.cpu_count()
    monkeypatch.setenv(cpu_pinning.ENV, f"{n - 1}")
    assert shared_cpus() == list(range(n - 1))
