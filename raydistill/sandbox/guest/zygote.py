"""The zygote: a clean, trusted Python process with the heavy authorized modules already imported.

Started once per host process (inside bubblewrap when available). It never runs model code; it only forks
new families (warden + first interpreter) on request, so a sandbox starts in milliseconds instead of the
~0.5 s that importing numpy and sympy costs.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys

from . import confine, interp, landlock, seccomp, warden
from .protocol import Channel


def _probe(fn) -> bool:
    """Run fn in a throwaway child; True when it exits 0."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                ok = fn()
            except BaseException:  # noqa: BLE001
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)


def _seccomp_works() -> bool:
    confine.set_no_new_privs()
    seccomp.install(seccomp.build(os.getpid()))
    try:
        import socket

        socket.socket()
    except PermissionError:
        return True
    return False


def _readable_as_nobody(paths: list[str]) -> bool:
    confine.drop_to_uid(65534, 65534)
    for p in paths:
        if os.path.isdir(p):
            os.listdir(p)
        elif os.path.exists(p):
            os.close(os.open(p, os.O_RDONLY))
    return True


def spawn_family(msg: dict, fds: list[int], ctx: dict) -> None:
    """Fork the family's warden (through a namespace-creating intermediate under bubblewrap)."""
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return
    try:
        wfd, ifd = fds
        confine.close_fds_except({wfd, ifd})
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        spec = msg["spec"]
        if ctx["mode"] == "bwrap":
            uid, gid = os.getuid(), os.getgid()
            confine.set_dumpable(True)  # /proc/self/*_map must be writable by us
            confine.unshare(confine.CLONE_NEWUSER | confine.CLONE_NEWPID | confine.CLONE_NEWNS)
            confine.write_id_maps(uid, gid)
            if os.fork() == 0:
                warden.main(spec, wfd, ifd, ctx)
            os._exit(0)
        warden.main(spec, wfd, ifd, ctx)
    except BaseException as e:  # noqa: BLE001
        try:
            Channel(fds[0]).send({"op": "error", "message": f"family setup failed: {type(e).__name__}: {e}"})
        except Exception:  # noqa: BLE001
            pass
    os._exit(1)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg.get("parent_pid"):
        confine.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != cfg["parent_pid"]:
            os._exit(1)
    if cfg.get("become"):
        uid, gid = cfg["become"]
        confine.drop_to_uid(uid, gid)
    confine.set_dumpable(False)
    os.nice(int(cfg.get("nice", 0)))
    if cfg.get("cpus"):  # before any thread starts: every fork inherits it (engines/cpu_pinning.shared_cpus)
        try:
            os.sched_setaffinity(0, cfg["cpus"])
        except OSError:
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    chan = Channel(cfg["fd"])
    sys.path[:0] = [p for p in cfg["sys_path"] if p not in sys.path]
    errors = {}
    for name in cfg.get("preload", []):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported to the host, which decides
            errors[name] = f"{type(e).__name__}: {e}"
    for name in cfg.get("warm_imports", []):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass
    import tokenize  # noqa: F401
    import traceback  # noqa: F401 - warm what interpreters use lazily

    if seccomp.arch() is not None:
        seccomp.build(0)  # cache the static part of the filter for every fork
    info = {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(), "preload_errors": errors,
            "python": sys.version.split()[0], "landlock_abi": landlock.abi(),
            "seccomp": seccomp.arch() is not None and _probe(_seccomp_works)}
    if cfg["mode"] == "fallback" and os.geteuid() == 0:
        info["dac_cap"] = not _probe(lambda: _readable_as_nobody(cfg.get("ro_paths", [])))
    ctx = {"mode": cfg["mode"], "dac_cap": info.get("dac_cap", False)}
    gc.collect()
    gc.freeze()
    chan.send({"op": "hello", "role": "zygote", "info": info})
    while True:
        got = chan.recv()
        if got is None:
            os._exit(0)
        msg, fds = got
        if msg.get("op") == "family" and len(fds) == 2:
            try:
                spawn_family(msg, fds, ctx)
                chan.send({"op": "family", "id": msg.get("id"), "ok": True})
            except OSError as e:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                chan.send({"op": "family", "id": msg.get("id"), "ok": False, "error": str(e)})
        elif msg.get("op") == "exit":
            os._exit(0)
        else:
            for fd in fds:
                os.close(fd)


_ = interp  # imported so forks inherit it already loaded
