"""Where the machine's CPU goes, per process, and CPU placement experiments (Linux /proc and /sys only).

The generate benchmark's stage decodes slower than bare on the same engine (higher inter-token latency at the
same tokens per iteration). For a 0.5B model the engine core's loop is CPU-bound, so these helpers show which
processes take the CPU in each window (and how often the engine core is preempted), and can give the engine
core and the teacher actor physical cores of their own, everything else of this user kept off them."""

from __future__ import annotations

import os
from pathlib import Path

from raydistill import procfs
from raydistill.engines.cpu_pinning import engine_core_pids, set_affinity

CLK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def my_pids() -> list[int]:
    """Processes of this user, kernel threads left out (as root, that is every user-space process)."""
    uid = os.getuid()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid and procfs.cmdline(int(d)):
                    out.append(int(d))
            except OSError:
                pass
    return out


def label(pid: int) -> str:
    return procfs.cmdline(pid)[:48] or _read(f"/proc/{pid}/comm").strip()


def engine_core_pid(frontend: int | None = None) -> int | None:
    """The vLLM engine core process under `frontend` (default: this process)."""
    found = engine_core_pids(frontend or os.getpid())
    return found[0] if found else None


def snapshot(engine_core: int | None) -> dict:
    """CPU seconds per process of this user; per thread and involuntary context switches for the engine core."""
    procs = {}
    for p in my_pids():
        f = procfs.stat_fields(f"/proc/{p}/stat")
        if f:
            procs[p] = (int(f[11]) + int(f[12])) / CLK
    ec = {}
    if engine_core:
        for t in os.listdir(f"/proc/{engine_core}/task") if os.path.isdir(f"/proc/{engine_core}/task") else []:
            f = procfs.stat_fields(f"/proc/{engine_core}/task/{t}/stat")
            st = _read(f"/proc/{engine_core}/task/{t}/status")
            inv = next((int(x.split()[1]) for x in st.splitlines() if x.startswith("nonvoluntary_ctxt_switches")), 0)
            if f:
                ec[int(t)] = ((int(f[11]) + int(f[12])) / CLK, inv, _read(f"/proc/{engine_core}/task/{t}/comm").strip())
    return {"procs": procs, "engine_core": engine_core, "ec": ec}


def delta(a: dict, b: dict, wall: float, top: int = 10) -> dict:
    """Busiest processes over the window (CPU cores), and the engine core's threads and preemptions per s."""
    d = {p: b["procs"][p] - a["procs"].get(p, 0.0) for p in b["procs"]}
    busy = sorted(d.items(), key=lambda kv: -kv[1])[:top]
    out = {"top_procs": [[label(p), p, round(v / wall, 3)] for p, v in busy if v > 0],
           "all_procs_cores": round(sum(d.values()) / wall, 3)}
    if b["ec"]:
        th = []
        for t, (cpu, inv, name) in b["ec"].items():
            c0, i0, _ = a["ec"].get(t, (0.0, 0, name))
            th.append((name, t, round((cpu - c0) / wall, 3), round((inv - i0) / wall, 1)))
        th.sort(key=lambda x: -x[2])
        out["engine_core"] = {"pid": b["engine_core"], "cores": round(sum(x[2] for x in th), 3),
                              "preempted_per_s": round(sum(x[3] for x in th), 1),
                              "threads": [list(x) for x in th[:4]]}
    return out


def sibling_groups() -> list[list[int]]:
    """Physical cores (groups of SMT siblings) among the CPUs this process may use, in CPU order."""
    allowed = range(os.cpu_count() or 1)  # not this process's set: the engine's own pinning narrowed it
    groups: dict[str, list[int]] = {}
    for c in allowed:
        sib = _read(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").strip() or str(c)
        groups.setdefault(sib, []).append(c)
    return list(groups.values())


class Placement:
    """The engine core alone on one physical core, the frontend (teacher actor) on another, every other
    process of this user on the rest (the engine's own `pin_cpus` moves only the first two); `release`
    gives everyone all CPUs again. Processes started later inherit their parent's set (sandbox forks, Ray
    workers started by the raylet)."""

    def __init__(self, engine_core: int, frontend: int) -> None:
        self.engine_core, self.frontend = engine_core, frontend
        groups = sibling_groups()
        self.all = {c for g in groups for c in g}
        self.ok = len(groups) >= 4
        if self.ok:
            self.ec_cpus, self.fe_cpus = set(groups[-1]), set(groups[-2])
            self.rest = self.all - self.ec_cpus - self.fe_cpus
        self.topology = groups

    def apply(self) -> dict:
        if not self.ok:
            return {"pinned": False, "why": f"{len(self.topology)} physical cores (need 4)"}
        threads = 0
        for p in my_pids():
            cpus = self.ec_cpus if p == self.engine_core else self.fe_cpus if p == self.frontend else self.rest
            threads += set_affinity(p, cpus)
        return {"pinned": True, "engine_core_cpus": sorted(self.ec_cpus), "frontend_cpus": sorted(self.fe_cpus),
                "rest": len(self.rest), "threads": threads}

    def release(self) -> dict:
        return release(self.all)


def release(all_cpus: set[int] | None = None) -> dict:
    """Every process of this user on all CPUs."""
    cpus = all_cpus or set(range(os.cpu_count() or 1))
    return {"pinned": False, "threads": sum(set_affinity(p, cpus) for p in my_pids())}
