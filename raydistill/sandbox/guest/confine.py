"""Process-level confinement through raw syscalls (ctypes): prctl, capabilities, namespaces, mounts, rlimits.

Python 3.11 has no os.unshare/mount/capset, so these are thin libc wrappers that raise OSError on failure.
"""

from __future__ import annotations

import ctypes
import os
import resource

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
NS_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
            | CLONE_NEWNET | CLONE_NEWTIME)

MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18

CAP_DAC_READ_SEARCH = 2
_CAPSET_V3 = 0x20080522


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    r = _libc.prctl(option, a2, a3, a4, a5)
    if r < 0:
        raise _err(f"prctl({option})")
    return r


def set_dumpable(on: bool) -> None:
    prctl(PR_SET_DUMPABLE, 1 if on else 0)


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_pdeathsig(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        raise _err("unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        raise _err(f"mount {fstype or source} on {target}")


def write_id_maps(uid: int, gid: int) -> None:
    """Map the caller's own uid/gid into the user namespace it just created (unprivileged form)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def capset(keep: int = 0) -> None:
    """Set effective = permitted = `keep` (bit mask), inheritable = 0, and clear ambient capabilities."""
    hdr = (ctypes.c_uint32 * 2)(_CAPSET_V3, 0)
    lo, hi = keep & 0xFFFFFFFF, keep >> 32
    data = (ctypes.c_uint32 * 6)(lo, lo, 0, hi, hi, 0)
    if _libc.capset(hdr, data) != 0:
        raise _err("capset")
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass


def drop_bounding_set(keep: int = 0) -> None:
    """Drop every capability not in `keep` from the bounding set (needs CAP_SETPCAP; best effort)."""
    for cap in range(64):
        if keep >> cap & 1:
            continue
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            break


def set_rlimit(which: int, soft: int, hard: int | None = None) -> None:
    """Lower a limit (never raises one above the current hard limit, which needs privilege)."""
    _, cur_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard) if hard != resource.RLIM_INFINITY else cur_hard
        soft = min(soft, hard) if soft != resource.RLIM_INFINITY else hard
    resource.setrlimit(which, (soft, hard))


def close_fds_except(keep: set[int]) -> None:
    """Close every descriptor >= 3 not in `keep` (close_range-backed)."""
    top = max(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1024)
    if top == resource.RLIM_INFINITY or top > 1 << 20:
        top = 1 << 20
    lo = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, top)


def stdio_to_devnull() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def set_oom_score_adj(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass


def drop_to_uid(uid: int, gid: int, keep_caps: int = 0) -> None:
    """Become uid/gid with no supplementary groups; keep only `keep_caps` (root-started processes)."""
    if keep_caps:
        drop_bounding_set(keep_caps)
        prctl(PR_SET_KEEPCAPS, 1)
    try:
        os.setgroups([])
    except OSError:
        pass
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep_caps:
        prctl(PR_SET_KEEPCAPS, 0)
        capset(keep_caps)
