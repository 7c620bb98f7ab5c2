"""A seccomp-BPF syscall filter built by hand (no libseccomp needed), for x86_64 and aarch64.

Denies what sandboxed Python never needs and what attacks use: creating sockets (network), exec, ptrace
and cross-process memory access, namespaces/mounts, kernel-module/bpf/perf/io_uring/keyring interfaces.
Signals and scheduling/limit syscalls that target other processes are allowed only for pid 0 ("myself /
my process group") and the installing process's own pid, so code cannot signal its parent, siblings or
the host. Seccomp cannot filter by path; Landlock (landlock.py) and mount namespaces do that.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct

from . import confine

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# BPF opcodes
LD_W_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
JSET_K = 0x45
RET_K = 0x06

SECCOMP_MODE_FILTER = 2
PR_SET_SECCOMP = 22

# syscall numbers: name -> (x86_64, aarch64); None where the architecture has no such call
_NR = {
    "socket": (41, 198), "connect": (42, 203), "accept": (43, 202), "bind": (49, 200), "listen": (50, 201),
    "accept4": (288, 242), "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "kcmp": (312, 272), "clone": (56, 220), "clone3": (435, 435), "unshare": (272, 97), "setns": (308, 268),
    "execve": (59, 221), "execveat": (322, 281), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106), "swapon": (167, 224),
    "swapoff": (168, 225), "reboot": (169, 142), "acct": (163, 89), "quotactl": (179, 60), "syslog": (103, 116),
    "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438),
    "process_madvise": (440, 440), "process_mrelease": (448, 448), "iopl": (172, None), "ioperm": (173, None),
    "modify_ldt": (154, None), "uselib": (134, None), "lookup_dcookie": (212, 18), "vhangup": (153, 58),
    "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "prlimit64": (302, 261), "setpriority": (141, 140), "ioprio_set": (251, 30),
    "sched_setaffinity": (203, 122), "sched_setscheduler": (144, 119), "sched_setparam": (142, 118),
    "sched_setattr": (314, 274), "migrate_pages": (256, 238), "move_pages": (279, 239), "ioctl": (16, 29),
}
TABLES = {machine: {name: nrs[i] for name, nrs in _NR.items() if nrs[i] is not None}
          for i, machine in enumerate(("x86_64", "aarch64"))}

DENY = ("socket", "connect", "accept", "bind", "listen", "accept4", "ptrace", "process_vm_readv",
        "process_vm_writev", "kcmp", "unshare", "setns", "execve", "execveat", "mount", "umount2",
        "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
        "mount_setattr", "open_by_handle_at", "name_to_handle_at", "bpf", "perf_event_open", "userfaultfd",
        "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "swapon", "swapoff",
        "reboot", "acct", "quotactl", "syslog", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
        "process_madvise", "process_mrelease", "iopl", "ioperm", "modify_ldt", "uselib", "lookup_dcookie",
        "vhangup")
# syscalls whose first argument is a pid (or tgid): allowed only for 0 or the filter owner's pid
PID_ARG0 = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "prlimit64", "sched_setaffinity",
            "sched_setscheduler", "sched_setparam", "sched_setattr", "migrate_pages", "move_pages")
PID_ARG1 = ("setpriority", "ioprio_set")  # (which, who)
TIOCSTI, TIOCLINUX = 0x5412, 0x541C


def arch() -> str | None:
    m = os.uname().machine
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m) if m in ("x86_64", "amd64", "aarch64", "arm64") else None


def _ins(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _ld_nr() -> bytes:
    return _ins(LD_W_ABS, 0, 0, 0)


def _ld_arg_lo(i: int) -> bytes:
    return _ins(LD_W_ABS, 0, 0, 16 + 8 * i)  # little-endian: low 32 bits first


def _rule(nr: int, body: list[bytes]) -> list[bytes]:
    """if (nr == NR) { body } -- body must end in a RET."""
    return [_ld_nr(), _ins(JEQ_K, 0, len(body), nr), *body]


def _pid_guard(arg: int, self_pid: int) -> list[bytes]:
    deny = RET_ERRNO | errno.EPERM
    return [_ld_arg_lo(arg), _ins(JEQ_K, 2, 0, 0), _ins(JEQ_K, 1, 0, self_pid), _ins(RET_K, 0, 0, deny),
            _ins(RET_K, 0, 0, RET_ALLOW)]


@functools.lru_cache(maxsize=4)
def _static(machine: str) -> tuple[bytes, bytes]:
    """(arch check + x32 guard, deny rules) -- the part of the program that does not depend on the pid."""
    t = TABLES[machine]
    deny = RET_ERRNO | errno.EPERM
    head = [_ins(LD_W_ABS, 0, 0, 4), _ins(JEQ_K, 1, 0, AUDIT_ARCH[machine]), _ins(RET_K, 0, 0, RET_KILL_PROCESS)]
    if machine == "x86_64":  # refuse the x32 ABI (syscall numbers with bit 30 set)
        head += [_ld_nr(), _ins(JGE_K, 0, 1, 0x40000000), _ins(RET_K, 0, 0, RET_ERRNO | errno.ENOSYS)]
    rules = []
    for name in DENY:
        if name in t:
            rules += _rule(t[name], [_ins(RET_K, 0, 0, deny)])
    # fork()-style clone only: no namespace flags; clone3 hides its flags in memory -> ENOSYS, glibc then
    # falls back to clone().
    rules += _rule(t["clone"], [_ld_arg_lo(0), _ins(JSET_K, 0, 1, confine.NS_FLAGS), _ins(RET_K, 0, 0, deny),
                                _ins(RET_K, 0, 0, RET_ALLOW)])
    rules += _rule(t["clone3"], [_ins(RET_K, 0, 0, RET_ERRNO | errno.ENOSYS)])
    rules += _rule(t["ioctl"], [_ld_arg_lo(1), _ins(JEQ_K, 1, 0, TIOCSTI), _ins(JEQ_K, 0, 1, TIOCLINUX),
                                _ins(RET_K, 0, 0, deny), _ins(RET_K, 0, 0, RET_ALLOW)])
    return b"".join(head), b"".join(rules)


def build(self_pid: int, *, full: bool = True, machine: str | None = None) -> bytes:
    """The filter program. full=False builds only the pid guards (stacked on forks, see interp.py)."""
    machine = machine or arch()
    if machine not in TABLES:
        raise OSError(errno.ENOSYS, f"no seccomp syscall table for {os.uname().machine}")
    t = TABLES[machine]
    head, rules = _static(machine)
    guards = []
    for name in PID_ARG0:
        guards += _rule(t[name], _pid_guard(0, self_pid))
    for name in PID_ARG1:
        guards += _rule(t[name], _pid_guard(1, self_pid))
    return head + (rules if full else b"") + b"".join(guards) + _ins(RET_K, 0, 0, RET_ALLOW)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(program: bytes) -> None:
    """Load the filter for this process and its future children (needs no_new_privs or CAP_SYS_ADMIN)."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    confine.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))
