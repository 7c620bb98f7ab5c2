"""The family warden: a trusted process (never runs model code) at the root of one sandbox family.

A family = the interpreter processes of one Sandbox and all its forks. With namespaces the warden is pid 1
of the family's own pid namespace (its exit kills the whole family) in its own user namespace (so
RLIMIT_NPROC counts this family only) with a private size-capped /tmp. Without namespaces it is a child
subreaper with its own session. It forks fresh interpreters and sweeps processes nobody registered
(what model code forked), so fork bombs and stray daemons do not outlive the step that made them.
"""

from __future__ import annotations

import os
import resource
import signal

from . import confine, interp
from .protocol import Channel


class Warden:
    def __init__(self, chan: Channel, spec: dict, ctx: dict):
        self.chan = chan
        self.spec = spec
        self.ctx = ctx
        self.ns = ctx["mode"] == "bwrap"
        self.procfd = -1
        self.self_view = os.getpid()

    # -- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        fam = self.spec["family"]
        uid, gid = os.getuid(), os.getgid()
        if self.ns:
            confine.mount(None, "/", None, confine.MS_REC | confine.MS_PRIVATE)
            self.procfd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
            self.self_view = int(os.readlink("self", dir_fd=self.procfd))
            confine.mount("tmpfs", "/tmp", "tmpfs", confine.MS_NOSUID | confine.MS_NODEV,
                          f"size={fam['tmp_bytes']},nr_inodes={fam['tmp_inodes']},mode=0700,uid={uid},gid={gid}")
            try:  # hide other families and kernel knobs; the warden keeps its own handle on /proc
                confine.mount("tmpfs", "/proc", "tmpfs", confine.MS_NOSUID | confine.MS_NODEV | confine.MS_NOEXEC,
                              "size=4k,nr_inodes=4,mode=0555")
            except OSError:
                pass
            self.spec["tmp_dir"] = "/tmp"
            resource.setrlimit(resource.RLIMIT_NPROC, (fam["max_processes"], fam["max_processes"]))
        else:
            os.setsid()
            confine.set_child_subreaper()
            confine.set_pdeathsig(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_term)
            self.procfd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
            tmp = fam["tmp_dir"]
            os.mkdir(tmp, 0o700)
            fuid = fam.get("uid")
            if fuid is not None:  # root-started: this family gets its own unprivileged uid
                os.chown(tmp, fuid, fuid)
                confine.drop_to_uid(fuid, fuid, keep_caps=1 << confine.CAP_DAC_READ_SEARCH
                                    if self.ctx.get("dac_cap") else 0)
                nproc = fam["max_processes"]
            else:  # same uid as the host: the limit counts all of its processes
                nproc = self._count_uid_processes(os.getuid()) + fam["max_processes"]
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            self.spec["tmp_dir"] = tmp
        confine.set_dumpable(False)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)

    def _on_term(self, signum, frame):
        self.kill_all()
        os._exit(0)

    def _count_uid_processes(self, uid: int) -> int:
        n = 0
        for name in os.listdir(self.procfd):
            if name.isdigit():
                try:
                    if os.stat(name, dir_fd=self.procfd).st_uid == uid:
                        n += 1
                except OSError:
                    pass
        return n

    # -- processes -------------------------------------------------------------------------------------
    def spawn(self, fd: int) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                self.chan.close()
                procfd = os.dup(self.procfd) if self.ns else None
                os.close(self.procfd)
                interp.start(self.spec, fd, procfd)
            finally:
                os._exit(1)
        os.close(fd)
        return pid

    def _stat(self, view_pid: str) -> tuple[int, int] | None:
        """(ppid, starttime) as seen in our /proc view."""
        try:
            fd = os.open(f"{view_pid}/stat", os.O_RDONLY, dir_fd=self.procfd)
            try:
                data = os.read(fd, 4096).decode("ascii", "replace")
            finally:
                os.close(fd)
            fields = data.rsplit(")", 1)[1].split()
            return int(fields[1]), int(fields[19])
        except (OSError, IndexError, ValueError):
            return None

    def _inner_pid(self, view_pid: str) -> int | None:
        """The pid in our own namespace (last NSpid entry)."""
        try:
            fd = os.open(f"{view_pid}/status", os.O_RDONLY, dir_fd=self.procfd)
            try:
                data = os.read(fd, 8192).decode("ascii", "replace")
            finally:
                os.close(fd)
            for line in data.splitlines():
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
        except (OSError, ValueError):
            pass
        return None

    def sweep(self, keep: set[int], spare: set[int] = frozenset()) -> int:
        """SIGKILL every descendant whose (own-namespace) pid is not in `keep`, except direct children of
        `spare` processes (a fork of theirs may not be registered yet); repeat until nothing is killed."""
        killed = 0
        for _ in range(20):
            table = {}
            for name in os.listdir(self.procfd):
                if name.isdigit():
                    st = self._stat(name)
                    if st is not None:
                        table[int(name)] = st
            children: dict[int, list[int]] = {}
            for pid, (ppid, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            inner = {self.self_view: os.getpid()}
            todo, victims = [self.self_view], []
            while todo:
                parent = todo.pop()
                for c in children.get(parent, ()):
                    todo.append(c)
                    inner[c] = self._inner_pid(str(c))
                    if inner[c] is not None and inner[c] not in keep and inner.get(parent) not in spare:
                        victims.append(c)
            n = 0
            for view_pid in victims:
                try:
                    pidfd = os.pidfd_open(inner[view_pid])
                except OSError:
                    continue
                try:  # same process as in the table (pid not reused meanwhile)?
                    st = self._stat(str(view_pid))
                    if st is not None and st[1] == table[view_pid][1]:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                        n += 1
                except OSError:
                    pass
                finally:
                    os.close(pidfd)
            killed += n
            if n == 0:
                break
        return killed

    def kill_all(self) -> None:
        if self.procfd >= 0:
            self.sweep(set())

    # -- serving ---------------------------------------------------------------------------------------
    def serve(self):
        while True:
            got = self.chan.recv()
            if got is None:
                break
            msg, fds = got
            op = msg.get("op")
            if op == "spawn":
                errors = []
                for fd in fds:
                    try:
                        self.spawn(fd)
                    except OSError as e:
                        errors.append(f"fork failed: {e}")
                        os.close(fd)
                self.chan.send({"op": "spawned", "ok": not errors, "errors": errors})
            elif op == "sweep":
                n = self.sweep({int(p) for p in msg.get("keep", [])}, {int(p) for p in msg.get("spare", [])})
                self.chan.send({"op": "swept", "killed": n})
            elif op == "ping":
                self.chan.send({"op": "pong"})
            elif op == "exit":
                break
            else:
                for fd in fds:
                    os.close(fd)
        self.kill_all()
        os._exit(0)


def main(spec: dict, wfd: int, ifd: int, ctx: dict) -> None:
    """Entry in the family's first process (never returns)."""
    chan = Channel(wfd)
    try:
        w = Warden(chan, spec, ctx)
        w.setup()
        w.spawn(ifd)
        chan.send({"op": "hello", "role": "warden", "pid": os.getpid()})
    except BaseException as e:  # noqa: BLE001
        try:
            chan.send({"op": "error", "message": f"family setup failed: {type(e).__name__}: {e}"})
        except OSError:
            pass
        os._exit(1)
    w.serve()
