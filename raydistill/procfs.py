"""Linux /proc reads shared by the pieces that look at other processes (the local Ray head's cleanup, the
engine's CPU placement, tests and benchmarks)."""

from __future__ import annotations

import os


def stat_fields(path: str) -> list[str] | None:
    """Fields of a /proc/<pid>[/task/<tid>]/stat file after "pid (comm) ": 0 state, 1 ppid, 11/12 utime/stime
    (clock ticks), 19 start time (clock ticks since boot); None when the process is gone."""
    try:
        with open(path) as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # comm may hold spaces and parentheses


def stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time in clock ticks, state) of a process; None when gone."""
    f = stat_fields(f"/proc/{pid}/stat")
    return (int(f[1]), int(f[19]), f[0]) if f else None


def cmdline(pid: int) -> str:
    """The command line, arguments joined by spaces ("" for kernel threads and processes gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every live (not zombie) descendant of `pid`, in this /proc's pid view."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := stat(int(name))) is not None and st[2] not in ("Z", "X"):
            children.setdefault(st[0], []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out
