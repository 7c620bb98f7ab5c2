"""Helpers shared by the sandbox tests: levels to test, a real-import snippet for attacks, process inspection."""

from __future__ import annotations

import os
import shutil

# The level that must be used where it works (bubblewrap), and the fallback forced explicitly.
LEVELS = (["bwrap"] if shutil.which("bwrap") else []) + ["seccomp"]

# Model code cannot `import os` (authorized-imports guard); real attacks reach the real importer anyway.
REAL_IMPORT = '''
def real_import(name):
    for c in ().__class__.__base__.__subclasses__():
        if c.__name__ == "catch_warnings":
            return c()._module.__builtins__["__import__"](name)
    raise RuntimeError("no escape hatch found")
'''


def descendants(pid: int) -> list[int]:
    """Host pids of every live descendant of `pid` (host /proc view)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
