"""Can this host cap a sandbox family's memory as a whole (cgroup v2)? Probed, never assumed.

A per-family cap needs the cgroup v2 `memory` controller, enabled in our cgroup and delegated to us
(writable). Where that is missing (cgroup v1 or hybrid hosts that bind `memory` to the v1 hierarchy owned
by the host's process manager, containers without delegation, ...) the family is bounded per process
(RLIMIT_AS) times its process budget (RLIMIT_NPROC), and oom_score_adj=1000 makes the OOM killer take
sandbox processes first; `Sandbox.isolation["memory_cap"]` says which holds and why.
"""

from __future__ import annotations

import functools
import os


def _cgroup2_mount(mountinfo: str) -> str | None:
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return left.split()[4]
    return None


def _own_cgroup(proc_cgroup: str) -> str | None:
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def probe(mountinfo: str, proc_cgroup: str, read=None, writable=None) -> tuple[str | None, str]:
    """(cgroup directory usable for per-family memory caps, or None; why). Inputs are the texts of
    /proc/self/mountinfo and /proc/self/cgroup, so the decision is testable on any host."""
    read = read or _read_text
    writable = writable or (lambda p: os.access(p, os.W_OK))
    mnt = _cgroup2_mount(mountinfo)
    if mnt is None:
        return None, "no cgroup v2 hierarchy is mounted (cgroup v1 only)"
    own = _own_cgroup(proc_cgroup)
    if own is None:
        return None, f"this process is not in the cgroup v2 hierarchy at {mnt}"
    path = os.path.normpath(mnt + "/" + own.lstrip("/"))
    try:
        controllers = read(os.path.join(path, "cgroup.controllers")).split()
    except OSError as e:
        return None, f"cannot read {path}/cgroup.controllers ({e.strerror})"
    if "memory" not in controllers:
        return None, (f"the memory controller is not available in the cgroup v2 hierarchy at {mnt} (it offers "
                      f"{' '.join(controllers) or 'no controllers'}; on hybrid hosts `memory` is bound to the v1 "
                      "hierarchy, which belongs to the host's process manager)")
    if not (writable(path) and writable(os.path.join(path, "cgroup.subtree_control"))):
        return None, f"the cgroup {path} is not delegated to this user (not writable)"
    return path, f"cgroup v2 memory controller delegated at {path}"


@functools.lru_cache(maxsize=1)
def memory_cap_status() -> dict:
    """What bounds a family's memory on this host (for `Sandbox.isolation`)."""
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
        with open("/proc/self/cgroup") as f:
            own = f.read()
        path, why = probe(mountinfo, own)
    except OSError as e:
        path, why = None, f"cannot inspect cgroups ({e})"
    # Even where a delegated controller exists, caps are not applied yet (see docs/sandbox.md), so the
    # report never claims more than holds.
    return {"family_memory_cap": False, "cgroup_v2_memory": path is not None, "memory_cap_why": why,
            "memory_bound": "per process: RLIMIT_AS x RLIMIT_NPROC per family; oom_score_adj=1000"}
