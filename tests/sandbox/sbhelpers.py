"""Helpers shared by the sandbox tests: levels to test, a real-import snippet for attacks, process inspection."""

from __future__ import annotations

import shutil

from raydistill import procfs

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


def alive(pid: int | None) -> bool:
    st = procfs.stat(pid) if pid is not None else None
    return st is not None and st[2] != "Z"
