"""The per-comparison time limit works off the main thread, kills stuck workers, and the pool recovers."""

from __future__ import annotations

import operator
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from raydistill import grading
from raydistill.grading.math import get_pool, math_equal
from raydistill.grading.worker_pool import CallTimeout, WorkerCrashed, WorkerError, WorkerPool

LIMIT = 1.0
SLACK = 3.0  # kill + reap is milliseconds; the rest is headroom for a shared, loaded 2-core machine
HOSTILE = [
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{(10^{10})!}",
    r"\boxed{10^{10^{10}}}",
]


@pytest.fixture(scope="module", autouse=True)
def _pool():
    grading.configure(workers=2)
    grading.warm_up()
    yield
    grading.configure()  # back to the defaults (also stops this module's workers)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_input_in_a_worker_thread_returns_false_within_the_limit(hostile):
    grading.warm_up()  # an idle worker is ready, so the measured time is the comparison alone
    kills = get_pool().kills
    with ThreadPoolExecutor(1) as ex:
        t0 = time.monotonic()
        fut = ex.submit(math_equal, hostile, "5", timeout=LIMIT)
        result = fut.result(timeout=60)
        elapsed = time.monotonic() - t0
    assert result is False
    assert LIMIT * 0.9 <= elapsed < LIMIT + SLACK, elapsed
    assert get_pool().kills == kills + 1


def test_symbolic_comparison_works_from_non_main_threads():
    def check(_):
        assert threading.current_thread() is not threading.main_thread()
        return math_equal(r"-14+4\sqrt{15}", r"4\sqrt{15}-14", timeout=30)

    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(check, range(6))) == [True] * 6


def test_concurrent_hostile_and_normal_calls_all_return_and_pool_recovers():
    pairs = [(HOSTILE[0], "5", False), (r"\frac{1}{2}", "0.5", True), (HOSTILE[1], "3", False),
             ("(3, \\pi/2)", r"\left( 3, \frac{\pi}{2} \right)", True), (HOSTILE[0], "7", False)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(pairs)) as ex:
        got = list(ex.map(lambda t: math_equal(t[0], t[1], timeout=LIMIT), pairs))
    elapsed = time.monotonic() - t0
    # the symbolic "True" pairs use the same short limit, so allow them a retry with a real limit if the
    # loaded machine made them time out; hostile ones must be False either way
    for (p, g, want), r in zip(pairs, got, strict=True):
        assert r is want or (want and math_equal(p, g, timeout=30)), (p, g, r)
    assert elapsed < 60, elapsed
    assert math_equal(r"\sqrt{8}", r"2\sqrt{2}", timeout=30) is True  # killed workers were replaced


def test_pool_kills_a_stuck_call_and_reports_crashes_and_errors():
    pool = WorkerPool(1)
    try:
        w_pid = None
        pool.warm()
        w_pid = pool._idle[0].proc.pid
        t0 = time.monotonic()
        with pytest.raises(CallTimeout, match="ran past 0.5s"):
            pool.call(time.sleep, 30, timeout=0.5)
        assert time.monotonic() - t0 < 0.5 + SLACK
        assert not _alive(w_pid) and pool.kills == 1
        with pytest.raises(WorkerError, match="ZeroDivisionError"):
            pool.call(operator.truediv, 1, 0, timeout=30)
        assert pool.call(operator.add, 2, 3, timeout=30) == 5  # a raised exception keeps the worker
        with pytest.raises(WorkerCrashed, match="exit code 3"):
            pool.call(os._exit, 3, timeout=30)
        assert pool.call(operator.mul, 6, 7, timeout=None) == 42
        assert pool.kills == 2
    finally:
        pool.close()


def test_worker_memory_cap_turns_a_huge_allocation_into_an_error():
    pool = WorkerPool(1, memory_limit_bytes=512 << 20)
    try:
        with pytest.raises(WorkerError, match="MemoryError"):
            pool.call(bytearray, 2 << 30, timeout=30)
        assert pool.call(len, "abc", timeout=30) == 3
    finally:
        pool.close()


def test_pool_rejects_bad_size_and_use_after_close():
    with pytest.raises(ValueError, match="size must be >= 1"):
        WorkerPool(0)
    pool = WorkerPool(1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.call(len, "x", timeout=1)


PARENT_SCRIPT = """
import threading, time
from concurrent.futures import ThreadPoolExecutor
from raydistill.grading.worker_pool import WorkerPool
pool = WorkerPool(1)
with ThreadPoolExecutor(1) as ex:  # asked for by a thread that exits right after
    ex.submit(pool.warm).result()
pid = pool._idle[0].proc.pid
threading.Thread(target=pool.call, args=(time.sleep, 600), kwargs={"timeout": None}, daemon=True).start()
print(pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_stuck_worker_dies_with_its_parent_process():
    parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        time.sleep(0.5)
        assert _alive(pid)  # the exit of the thread that asked for it did not kill it
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
