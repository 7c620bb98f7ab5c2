"""A vLLM engine core and its frontend on CPUs of their own.

With a small model the engine core is CPU-bound: one thread at ~1 core schedules, prepares inputs and hands
work to its helper threads and to the frontend process (our event loop). Left to the OS scheduler on the
H200 VM (KVM, 16 vCPUs, no SMT), these hand-offs wander across CPUs: in one run the same engine decoded at
11.3-12.1 ms per token against 8.7-9.5 ms with the engine core on one CPU and the frontend on another, and the
stage's episode path made 17.8k vs 24.3k tokens/s (docs/benchmarks.md, seventh session). The CPUs are taken from the top of
the node's CPUs, one pair per GPU slot, so that engines of one node do not collide without talking to each
other. The pinned CPUs are published in the frontend's environment so that processes it starts later
(in-actor sandbox zygotes) keep off them instead of inheriting the frontend's single CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from raydistill import procfs

log = logging.getLogger(__name__)

ENV = "RAYDISTILL_ENGINE_CPUS"
"""CPUs reserved for an engine in this process tree (comma list), set by `pin_engine`."""


def plan(allowed: Iterable[int], slot: int) -> tuple[int, int] | None:
    """(engine core CPU, frontend CPU) for the engine in `slot` (its first GPU's index on the node); None when
    reserving them would leave fewer than half of the CPUs (and at least 2) to everything else."""
    cpus = sorted(allowed)
    used = 2 * (slot + 1)
    if slot < 0 or len(cpus) - used < max(2, len(cpus) // 2):
        return None
    return cpus[-(2 * slot + 1)], cpus[-(2 * slot + 2)]


def set_affinity(pid: int, cpus: set[int]) -> int:
    """Every thread of `pid` (sched_setaffinity(pid) alone moves only its main thread); threads moved.
    Threads started later inherit the set of the thread that starts them."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return 0
    moved = 0
    for t in tids:
        try:
            os.sched_setaffinity(t, cpus)
            moved += 1
        except OSError:  # the thread exited
            pass
    return moved


def engine_core_pids(frontend: int) -> list[int]:
    """vLLM's engine core processes under `frontend`, found by the process title vLLM gives them."""
    return [p for p in procfs.descendants(frontend) if "EngineCore" in procfs.cmdline(p)]


def _pinned_elsewhere(ours: list[int]) -> set[int]:
    """CPUs that other engines on this machine hold: their engine cores' and frontends' single CPUs."""
    taken: set[int] = set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in ours or "EngineCore" not in procfs.cmdline(int(d)):
            continue
        st = procfs.stat(int(d))
        for pid in (int(d), st[0]) if st else ():
            try:
                cpus = os.sched_getaffinity(pid)
            except OSError:
                continue
            if len(cpus) == 1:
                taken |= cpus
    return taken


def gpu_slot() -> int:
    """This process's first GPU index on its node (Ray sets CUDA_VISIBLE_DEVICES to physical ids); 0 if unknown."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def pin_engine(frontend: int | None = None, slot: int | None = None) -> dict:
    """Pin the engine core(s) under `frontend` (default: this process) to one CPU and the frontend to
    another; returns what was done, or why not (never raises: placement is an optimisation)."""
    frontend = os.getpid() if frontend is None else frontend
    slot = gpu_slot() if slot is None else slot
    try:
        allowed = os.sched_getaffinity(frontend)
    except OSError as e:
        return {"pinned": False, "why": f"cannot read the CPU set: {e}"}
    cores = engine_core_pids(frontend)
    if not cores:
        return {"pinned": False, "why": "no vLLM EngineCore process found"}
    if len(cores) > 1:  # data parallel: one CPU would serialize the engine cores
        return {"pinned": False, "why": f"{len(cores)} engine core processes (data parallel)"}
    taken = _pinned_elsewhere(cores)
    first = slot
    while (cpus := plan(allowed, slot)) is not None and taken & set(cpus):
        slot += 1  # engines sharing a GPU (fractional num_gpus) share its slot: the next free pair
    if cpus is None:
        return {"pinned": False, "why": f"{len(allowed)} CPUs: too few for GPU slot {first}"
                + (f" with CPUs {sorted(taken)} pinned by other engines" if taken else "")}
    ec, fe = cpus
    threads = sum(set_affinity(p, {ec}) for p in cores) + set_affinity(frontend, {fe})
    if frontend == os.getpid():
        os.environ[ENV] = f"{ec},{fe}"
    info = {"pinned": True, "engine_core_cpu": ec, "frontend_cpu": fe, "engine_core_pids": cores,
            "threads": threads}
    log.info("engine core pinned to CPU %d, its frontend to CPU %d (%d threads)", ec, fe, threads)
    return info


def shared_cpus() -> list[int] | None:
    """The CPUs a process started from a pinned frontend should use (all but the engine's), or None when
    nothing is pinned here."""
    reserved = {int(x) for x in os.environ.get(ENV, "").split(",") if x.strip().isdigit()}
    if not reserved:
        return None
    rest = sorted(set(range(os.cpu_count() or 1)) - reserved)
    return rest or None
