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
        self.last_pid: int | None = None
        self.deferred: set[int] = set()

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
            # hide other families and kernel knobs (the warden keeps its own handle on /proc), and close the
            # one shared writable place bubblewrap leaves (/dev/shm on its /dev tmpfs)
            for target in ("/proc", "/dev/shm"):
                try:
                    confine.mount("tmpfs", target, "tmpfs", confine.MS_NOSUID | confine.MS_NODEV | confine.MS_NOEXEC,
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

    def _stat(self, view_pid: int) -> tuple[int, int] | None:
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

    def _read_int_lines(self, path: str, key: str) -> list[int] | None:
        try:
            fd = os.open(path, os.O_RDONLY, dir_fd=self.procfd)
            try:
                data = os.read(fd, 8192).decode("ascii", "replace")
            finally:
                os.close(fd)
        except OSError:
            return None
        for line in data.splitlines():
            if line.startswith(key):
                try:
                    return [int(x) for x in line.split()[1:]]
                except ValueError:
                    return None
        return None

    def _kill_checked(self, inner: int, view: int, starttime: int) -> bool:
        """SIGKILL through a pidfd, after checking the pid still names the process we looked at."""
        try:
            pidfd = os.pidfd_open(inner)
        except OSError:
            return False
        try:
            st = self._stat(view)
            if st is None or st[1] != starttime:
                return False
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return True
        except OSError:
            return False
        finally:
            os.close(pidfd)

    def sweep(self, keep: set[int], keep_view: set[int], spare_view: set[int] = frozenset(),
              as_of: int | None = None) -> int:
        """SIGKILL every family process that is not registered (`keep` in our pid namespace, `keep_view` in
        our /proc view), except children of `spare_view` processes (their fork may not be registered yet)
        and processes started at or after `as_of` (boot-time clock ticks, as in /proc/<pid>/stat)."""
        if self.ns and as_of is not None:
            n = self._sweep_new(keep, spare_view, as_of)
            if n is not None:
                return n
        return self._sweep_all(keep_view, spare_view, as_of)

    def _sweep_new(self, keep: set[int], spare_view: set[int], as_of: int) -> int | None:
        """Fast path (pid namespace): only pids allocated since the last sweep, or deferred then, are
        candidates -- ns_last_pid tells which. None when the pid counter wrapped (use the full scan)."""
        try:
            fd = os.open("sys/kernel/ns_last_pid", os.O_RDONLY, dir_fd=self.procfd)
            try:
                cur_pid = int(os.read(fd, 32))
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return None
        if self.last_pid is None or cur_pid < self.last_pid or cur_pid - self.last_pid > 4096:
            self.last_pid = cur_pid
            self.deferred = set()
            return None
        cands = set(range(self.last_pid + 1, cur_pid + 1)) | self.deferred
        self.last_pid, self.deferred = cur_pid, set()
        killed = 0
        me = os.getpid()
        for pid in sorted(cands):
            if pid in keep or pid == me:
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # already gone
            try:
                view = self._read_int_lines(f"self/fdinfo/{pidfd}", "Pid:")
                st = self._stat(view[0]) if view and view[0] > 0 else None
                if st is None:
                    continue
                if st[0] in spare_view or st[1] >= as_of:
                    self.deferred.add(pid)  # look again next time
                    continue
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
            finally:
                os.close(pidfd)
        return killed

    def _sweep_all(self, keep_view: set[int], spare_view: set[int], as_of: int | None) -> int:
        """Full scan of our /proc view: every descendant of this warden is a candidate."""
        killed = 0
        for _ in range(20):
            table = {}
            for name in os.listdir(self.procfd):
                if name.isdigit():
                    st = self._stat(int(name))
                    if st is not None:
                        table[int(name)] = st
            children: dict[int, list[int]] = {}
            for pid, (ppid, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            todo, n = [self.self_view], 0
            while todo:
                parent = todo.pop()
                for c in children.get(parent, ()):
                    todo.append(c)
                    if c in keep_view or parent in spare_view or (as_of is not None and table[c][1] >= as_of):
                        continue
                    inner = self._read_int_lines(f"{c}/status", "NSpid:")
                    if inner and self._kill_checked(inner[-1], c, table[c][1]):
                        n += 1
            killed += n
            if n == 0:
                break
        return killed

    def kill_all(self) -> None:
        if self.procfd >= 0:
            self._sweep_all(set(), set(), None)

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
                as_of = msg.get("as_of")
                n = self.sweep(_ints(msg, "keep"), _ints(msg, "keep_view"), _ints(msg, "spare_view"),
                               int(as_of) if as_of is not None else None)
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


def _ints(msg: dict, key: str) -> set[int]:
    return {int(p) for p in msg.get(key, [])}


def main(spec: dict, wfd: int, ifd: int, ctx: dict) -> None:
    """Entry in the family's first process (never returns)."""
    chan = Channel(wfd)
    try:
        w = Warden(chan, spec, ctx)
        w.setup()
        w.spawn(ifd)
        if w.ns:  # sweeps only look at pids allocated after this point
            try:
                fd = os.open("sys/kernel/ns_last_pid", os.O_RDONLY, dir_fd=w.procfd)
                w.last_pid = int(os.read(fd, 32))
                os.close(fd)
            except (OSError, ValueError):
                pass
        chan.send({"op": "hello", "role": "warden", "pid": os.getpid()})
    except BaseException as e:  # noqa: BLE001
        try:
            chan.send({"op": "error", "message": f"family setup failed: {type(e).__name__}: {e}"})
        except OSError:
            pass
        os._exit(1)
    w.serve()
