"""The authorized-imports guard: a usability rule that gives the model a clear error, NOT a security
boundary (code can reach the real importer through object introspection; the OS layers contain it)."""

from __future__ import annotations

import builtins


def make_import(authorized: list[str]):
    allowed = frozenset(authorized)
    allow_all = "*" in allowed
    listing = ", ".join(sorted(allowed - {"*"}))
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            raise ImportError("Relative imports are not available in this interpreter.")
        top = name.partition(".")[0]
        if not allow_all and top not in allowed:
            raise ImportError(f"Import of {name!r} is not allowed. Authorized imports are: {listing} "
                              "(and their submodules).")
        return real_import(name, globals, locals, fromlist, level)

    return guarded_import
