"""How the zygote process is started: under bubblewrap (namespaces) or bare (seccomp/Landlock/rlimits).

Root hosts: the sandbox must not run as kernel uid 0 (RLIMIT_NPROC does not apply to root and root owns
most files). With bubblewrap we pre-create a user namespace mapping {0 -> 0, U -> U} (U = 65534), let
bwrap do its mounts as the namespace's root (it can then reach paths such as a Python under /root), and
the zygote drops to U before importing anything. Without namespaces each family gets its own uid.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent / "guest"
GUEST_MOUNT = "/opt/raydistill-sandbox"
BOOT = ("import sys; sys.path.insert(0, {path!r}); import guest.zygote as z; sys.path.remove({path!r}); "
        "z.main()")
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp",
    "TMPDIR": "/tmp", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1",
}
SYSTEM_RO = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_RO_FILES = ("/etc/ld.so.cache", "/etc/localtime")
NOBODY = 65534


@dataclass
class LaunchPlan:
    mode: str  # "bwrap" | "fallback"
    argv: list[str]
    pass_fds: tuple[int, ...]
    env: dict[str, str] | None
    cwd: str | None
    ro_paths: list[str] = field(default_factory=list)
    userns_fd: int | None = None
    tmp_base: str | None = None


def python_executable() -> str:
    """The real interpreter binary (a venv's python is a symlink to it; we add site dirs ourselves)."""
    return os.path.realpath(sys.executable)


def prefix_dirs() -> list[str]:
    return sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)})


def _is_site_dir(path: str) -> bool:
    return os.path.basename(path) in ("site-packages", "dist-packages")


def module_dirs(modules: list[str] | tuple[str, ...]) -> list[str]:
    """Site directories the sandbox needs: every site-packages dir on sys.path (so dependencies of the
    authorized modules resolve), plus any other sys.path entry that holds an authorized module."""
    entries = sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}, key=len, reverse=True)
    prefixes = prefix_dirs()
    found = [e for e in sorted(entries) if _is_site_dir(e)]
    for name in modules:
        if name == "*":
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if spec.origin not in (None, "built-in", "frozen"):
            loc = os.path.realpath(spec.origin)
        elif spec.submodule_search_locations:
            loc = os.path.realpath(list(spec.submodule_search_locations)[0])
        else:
            continue
        for entry in entries:
            if loc.startswith(entry + os.sep):
                in_prefix = any(entry == p or entry.startswith(p + os.sep) for p in prefixes)
                if entry not in found and not in_prefix:
                    found.append(entry)
                break
    return found


def read_paths(site_dirs: list[str]) -> list[str]:
    """What the sandbox may read: the Python installation, the needed site dirs, system libraries."""
    paths = [*prefix_dirs(), *site_dirs, str(GUEST_DIR)]
    paths += [p for p in SYSTEM_RO if os.path.exists(p)]
    paths += [p for p in SYSTEM_RO_FILES if os.path.exists(p)]
    paths += ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]
    return paths


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def make_root_userns(uid: int = NOBODY) -> int:
    """As root: a user namespace mapping 0->0 and uid->uid; returns an fd on it (kept alive by the fd)."""
    helper = ("import ctypes, os, sys\n"
              "ok = ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0\n"
              "os.write(1, b'k' if ok else b'e'); sys.stdin.read()\n")
    p = subprocess.Popen([python_executable(), "-I", "-S", "-c", helper], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={})
    try:
        if p.stdout.read(1) != b"k":
            raise OSError("unshare(CLONE_NEWUSER) is not permitted here")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{p.pid}/{name}", "w") as f:
                f.write(f"0 0 1\n{uid} {uid} 1\n")
        return os.open(f"/proc/{p.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        p.stdin.close()
        p.wait()


def bwrap_plan(zfd: int, cfg: dict, site_dirs: list[str], tmp_mb: int) -> LaunchPlan:
    bwrap = bwrap_path()
    if bwrap is None:
        raise OSError("bubblewrap (bwrap) is not installed")
    args = [bwrap]
    userns_fd = None
    if os.geteuid() == 0:
        userns_fd = make_root_userns(NOBODY)
        args += ["--userns", str(userns_fd), "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                 "--unshare-cgroup-try", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        cfg = dict(cfg, become=[NOBODY, NOBODY])
    else:
        args += ["--unshare-all"]
    args += ["--die-with-parent", "--new-session", "--clearenv", "--hostname", "sandbox"]
    for k, v in SANDBOX_ENV.items():
        args += ["--setenv", k, v]
    made: set[str] = {"/"}

    def dirs_for(dest: str) -> list[str]:
        out = []
        for anc in reversed(Path(dest).parents):
            a = str(anc)
            if a not in made:
                made.add(a)
                out += ["--perms", "0755", "--dir", a]
        return out

    bound: list[str] = []
    for p in SYSTEM_RO:
        if os.path.islink(p):
            args += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            args += ["--ro-bind", p, p]
            bound.append(p)
    for p in SYSTEM_RO_FILES:
        if os.path.exists(p):
            args += [*dirs_for(p), "--ro-bind", p, p]
    for p in sorted(set(prefix_dirs() + site_dirs)):
        if any(p == b or p.startswith(b + os.sep) for b in bound):
            continue
        args += [*dirs_for(p), "--ro-bind", p, p]
        bound.append(p)
    guest_dest = f"{GUEST_MOUNT}/guest"
    args += [*dirs_for(guest_dest), "--ro-bind", str(GUEST_DIR), guest_dest]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmp_mb << 20), "--tmpfs", "/tmp",
             "--remount-ro", "/", "--chdir", "/tmp"]
    cfg = dict(cfg, fd=zfd, mode="bwrap")
    args += [python_executable(), "-I", "-S", "-B", "-c", BOOT.format(path=GUEST_MOUNT), json.dumps(cfg)]
    return LaunchPlan("bwrap", args, (zfd,) + ((userns_fd,) if userns_fd is not None else ()), None, None,
                      read_paths(site_dirs), userns_fd)


def fallback_plan(zfd: int, cfg: dict, site_dirs: list[str], tmp_base: str) -> LaunchPlan:
    ro = read_paths(site_dirs)
    cfg = dict(cfg, fd=zfd, mode="fallback", parent_pid=os.getpid(), ro_paths=ro)
    path = str(GUEST_DIR.parent)
    argv = [python_executable(), "-I", "-S", "-B", "-c", BOOT.format(path=path), json.dumps(cfg)]
    env = dict(SANDBOX_ENV, HOME=tmp_base, TMPDIR=tmp_base)
    return LaunchPlan("fallback", argv, (zfd,), env, tmp_base, ro, None, tmp_base)
