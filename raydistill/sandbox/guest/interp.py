"""The persistent interpreter: one process per live sandbox state, serving `run` / `fork` requests.

Everything here runs after confinement, next to model-written code that can overwrite any of it. The host
therefore trusts nothing this process sends (sizes, pids, JSON) and enforces time limits by killing.
"""

from __future__ import annotations

import ast
import builtins
import json
import linecache
import os
import resource
import signal
import sys
import time
import traceback

from . import capture, confine, imports, landlock, seccomp
from .protocol import Channel, encode

_UNSET = object()
SNAPSHOT_DELAY_S = 0.001
"""Pause between sending a step's result and forking its snapshot. The fork and the copy-on-write faults
after it (a few ms of CPU) otherwise compete for the 2 cores with the host threads delivering the result:
measured on the dev box at 20 ms think gaps, step p50 3.85 -> 2.25 ms (half the steps were +2 ms); costs
~1 ms on back-to-back steps and forks right after a step, which wait for the snapshot."""


class StepTimeout(BaseException):
    """Raised inside model code when the step's wall-clock budget (tool time excluded) runs out."""


class CPUTimeExceeded(BaseException):
    """Raised inside model code when the step's CPU budget runs out (SIGXCPU)."""


class _FinalAnswer(BaseException):
    """Unwinds the step after final_answer(); BaseException so `except Exception` in model code misses it."""


class ToolError(Exception):
    """A tool call failed on the host side (its message is shown to the model)."""


def _answer_value(x):
    """final_answer's argument as a JSON-safe value (primitives as they are, everything else as str())."""
    if x is None or isinstance(x, bool | float):
        return x
    if isinstance(x, int):
        if -(2**63) < x < 2**63:
            return int(x)
        try:
            return str(x)
        except ValueError:
            return f"<int with about {x.bit_length() * 0.30103:.0f} digits>"
    try:
        s = x if isinstance(x, str) else str(x)
    except BaseException as e:  # noqa: BLE001 - str() of model objects may raise anything
        s = f"<str() failed: {type(e).__name__}>"
    return capture.clean(str(s))


class Interpreter:
    def __init__(self, spec: dict, chan: Channel):
        self.spec = spec
        self.chan = chan
        self.role = "active"
        self.pid = os.getpid()
        self.step = 0
        self.in_user = False
        self.final = _UNSET
        self.timeout_s = 0.0
        self.max_output = int(spec.get("max_output_chars", 50_000))
        self.max_value = int(spec.get("max_value_chars", 10_000))
        self.max_error = int(spec.get("max_error_chars", 10_000))
        self.max_tool_arg = int(spec.get("max_tool_arg_chars", 100_000))
        self.memory_mb = spec.get("memory_mb")
        user_builtins = dict(builtins.__dict__)
        user_builtins["__import__"] = imports.make_import(spec.get("authorized_imports", []))
        self.globals: dict = {"__name__": "__main__", "__doc__": None, "__builtins__": user_builtins}
        self.globals["final_answer"] = self._make_final_answer()
        for name in spec.get("tools", []):
            self.globals[name] = self._make_tool(name)
        self.globals["ToolError"] = ToolError
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.signal(signal.SIGXCPU, self._on_xcpu)

    # -- signals ---------------------------------------------------------------------------------------
    def _on_alarm(self, signum, frame):
        if self.in_user:
            raise StepTimeout()

    def _on_xcpu(self, signum, frame):
        if self.in_user:
            raise CPUTimeExceeded()

    # -- namespace helpers -----------------------------------------------------------------------------
    def _make_final_answer(self):
        interp = self

        def final_answer(answer):
            """Give the final answer and end the episode."""
            interp.final = answer
            raise _FinalAnswer()

        return final_answer

    def _make_tool(self, name: str):
        interp = self

        def tool(*args, **kwargs):
            return interp._call_tool(name, args, kwargs)

        tool.__name__ = tool.__qualname__ = name
        tool.__doc__ = f"{name}(...): a tool; it runs outside this interpreter and returns its result."
        return tool

    def _call_tool(self, name, args, kwargs):
        if os.getpid() != self.pid:
            raise RuntimeError("tools can only be called from the interpreter process itself")
        payload = {"op": "tool", "name": name, "args": list(args), "kwargs": kwargs}
        try:
            size = len(json.dumps(payload, ensure_ascii=True))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}() arguments must be JSON-serializable (str, int, float, bool, None, "
                            f"list, dict): {e}") from None
        if size > self.max_tool_arg:
            raise ValueError(f"{name}() arguments are too large ({size} characters, limit {self.max_tool_arg})")
        was_user, self.in_user = self.in_user, False
        remaining = signal.setitimer(signal.ITIMER_REAL, 0)[0]
        try:
            self.chan.send(payload)
            got = self.chan.recv()
        finally:
            if remaining > 0:
                signal.setitimer(signal.ITIMER_REAL, remaining)
            self.in_user = was_user
        if got is None:
            os._exit(0)
        msg = got[0]
        if msg.get("op") != "tool_result":
            raise RuntimeError(f"unexpected reply to tool call: {msg.get('op')!r}")
        if msg.get("ok"):
            return msg.get("value")
        raise ToolError(str(msg.get("error")))

    # -- steps -----------------------------------------------------------------------------------------
    def run_step(self, msg: dict, namespace: dict | None = None) -> dict:
        code = msg.get("code")
        ns = self.globals if namespace is None else namespace
        self.timeout_s = float(msg.get("timeout_s") or 0)
        cpu_s = float(msg.get("cpu_s") or 0)
        self.step += 1
        fname = f"<code step {self.step}>"
        out = capture.CappedText(self.max_output)
        self.final = _UNSET
        value = error = etype = None
        t0 = time.perf_counter()
        try:
            if not isinstance(code, str):
                raise TypeError("code must be a string")
            tree = ast.parse(code, filename=fname, mode="exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            body = compile(tree, fname, "exec", dont_inherit=True)
            tail = compile(last, fname, "eval", dont_inherit=True) if last is not None else None
            linecache.cache[fname] = (len(code), None, code.splitlines(True), fname)
            v = None
            saved = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = out
            self._arm(cpu_s)
            try:
                self.in_user = True
                exec(body, ns)
                if tail is not None:
                    v = eval(tail, ns)
            finally:
                self.in_user = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                sys.stdout, sys.stderr = saved
            if os.getpid() != self.pid:  # model code forked and its child came back here: not ours
                os._exit(0)
            if v is not None:
                value = capture.clip(capture.clean(_safe_repr(v)), self.max_value)
        except _FinalAnswer:
            pass
        except BaseException as e:  # noqa: BLE001 - everything model code raises becomes an error message
            self.in_user = False
            if os.getpid() != self.pid:
                os._exit(0)
            etype, error = self._format_error(e, fname)
        is_final = self.final is not _UNSET
        answer = _answer_value(self.final) if is_final else None
        if isinstance(answer, str):
            answer = capture.clip(answer, self.max_value)
        self.final = _UNSET
        return {"stdout": capture.clean(out.getvalue()), "stdout_chars": out.total, "value": value,
                "error": error, "error_type": etype, "is_final": is_final, "final_answer": answer,
                "exec_s": time.perf_counter() - t0}

    def _arm(self, cpu_s: float) -> None:
        if self.timeout_s > 0:
            signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        if cpu_s > 0:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            soft = int(ru.ru_utime + ru.ru_stime + cpu_s) + 1
            hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            try:
                resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
            except (OSError, ValueError):
                pass

    def _format_error(self, e: BaseException, fname: str) -> tuple[str, str]:
        if isinstance(e, StepTimeout):
            return "timeout", (f"TimeoutError: the code did not finish within {self.timeout_s:g} seconds and was "
                               "interrupted (variables keep the values they had at that point).")
        if isinstance(e, CPUTimeExceeded):
            return "timeout", "TimeoutError: the code used up its CPU time limit and was interrupted."
        try:
            tbe = traceback.TracebackException(type(e), e, e.__traceback__, compact=True)
            lines = []
            frames = [f for f in tbe.stack if (f.filename or "").startswith("<code step ")]
            if frames:
                lines.append("Traceback (most recent call last):\n")
                for f in frames[-12:]:
                    name = "<code>" if f.filename == fname else f.filename.replace("<code step ", "<code from step ")
                    lines.append(f'  File "{name}", line {f.lineno}, in {f.name}\n')
                    if f.line:
                        lines.append(f"    {f.line.strip()}\n")
            only = "".join(tbe.format_exception_only())
            lines.append(only.replace(f'"{fname}"', '"<code>"'))
            text = "".join(lines).rstrip("\n")
        except BaseException:  # noqa: BLE001 - a hostile exception object may break formatting
            text = f"{type(e).__name__}: <exception could not be formatted>"
        if isinstance(e, MemoryError):
            text += f"\n(the interpreter's memory limit of {self.memory_mb} MiB was reached)"
        elif isinstance(e, RecursionError):
            text += "\n(recursion too deep)"
        return type(e).__name__, capture.clip(capture.clean(text), self.max_error)

    # -- serving ---------------------------------------------------------------------------------------
    def hello(self) -> None:
        self.chan.send({"op": "hello", "role": self.role, "pid": os.getpid()})

    def serve(self):
        while True:
            got = self.chan.recv()
            if got is None:
                os._exit(0)
            msg, fds = got
            op = msg.get("op")
            if op == "run" and self.role == "active":
                res = self.run_step(msg)
                self.chan.send({"op": "result", **res})
                if fds:
                    if msg.get("snapshot") == "always" or res["error"] is None:
                        time.sleep(SNAPSHOT_DELAY_S)
                        if self._fork_into(fds, "snapshot"):
                            self._prefault()
                    else:
                        for fd in fds:
                            os.close(fd)
                        self.chan.send({"op": "forked", "ok": False, "skipped": True, "pids": [], "errors": []})
            elif op == "fork":
                if self._fork_into(fds, msg.get("role", "active")) and self.role == "active":
                    self._prefault()  # (a snapshot that was forked from runs no steps: let it be)
            elif op == "activate" and self.role == "snapshot":  # the host hands this copy to a new fork
                self.role = "active"
            elif op == "ping":
                self.chan.send({"op": "pong"})
            elif op == "exit":
                os._exit(0)
            else:
                for fd in fds:
                    os.close(fd)
                self.chan.send({"op": "error", "message": f"bad request {op!r} for a {self.role} interpreter"})

    def _prefault(self) -> None:
        """After a fork this process shares its pages copy-on-write with the child, so the next step would pay
        a page fault for every page it writes (~130 in a small step). Running a tiny private step now, while
        waiting for the next request, takes most of those faults off the next step's critical path. It
        touches no name of the model's namespace and its outcome is ignored."""
        step = self.step
        try:
            res = self.run_step({"code": "v = [i * i for i in (1, 2, 3)]\nv"}, {"__builtins__": {}})
            json.loads(encode({"op": "result", **res})[4:])
        except BaseException:  # noqa: BLE001, S110 - an optimisation only
            pass
        finally:
            linecache.cache.pop(f"<code step {self.step}>", None)
            self.step = step

    def _fork_into(self, fds: list[int], role: str) -> bool:
        """Fork one child per channel fd; each child continues this loop on its own channel. True in the
        process that forked (False in a child)."""
        pids, errors = [], []
        for i, fd in enumerate(fds):
            try:
                pid = os.fork()
            except OSError as e:
                errors.append(f"fork failed: {e}")
                for rest in fds[i:]:
                    os.close(rest)
                break
            if pid == 0:
                for other in [*fds, *self.chan.pending_fds()]:  # not ours: siblings' channels
                    if other != fd:
                        try:
                            os.close(other)
                        except OSError:
                            pass
                self.chan.close()
                self.chan = Channel(fd, self.chan.max_frame)
                self._after_fork(role)
                return False
            os.close(fd)
            pids.append(pid)
        self.chan.send({"op": "forked", "ok": not errors, "pids": pids, "errors": errors})
        return True

    def _after_fork(self, role: str) -> None:
        self.role = role
        self.pid = os.getpid()
        self.in_user = False
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        if self.spec.get("seccomp"):
            try:  # stack a filter that lets this process signal only itself (and not its parent)
                seccomp.install(seccomp.build(self.pid, full=False))
            except OSError:
                pass
        self.hello()


def _safe_repr(v) -> str:
    try:
        return repr(v)
    except BaseException as e:  # noqa: BLE001
        return f"<repr() failed: {type(e).__name__}>"


def start(spec: dict, fd: int, procfd: int | None) -> None:
    """Confine this freshly forked process, then serve forever (never returns)."""
    chan = None
    try:
        os.setpgid(0, 0)
        confine.close_fds_except({fd} | ({procfd} if procfd is not None else set()))
        confine.stdio_to_devnull()
        chan = Channel(fd, int(spec.get("max_frame", 256 << 20)))
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # reap whatever model code forks
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        tmp = spec["tmp_dir"]
        os.chdir(tmp)
        os.environ.clear()
        os.environ.update(spec.get("env", {}))
        os.environ.update(HOME=tmp, TMPDIR=tmp)
        if procfd is not None:
            try:
                wfd = os.open("self/oom_score_adj", os.O_WRONLY, dir_fd=procfd)
                os.write(wfd, b"1000")
                os.close(wfd)
            except OSError:
                pass
            os.close(procfd)
        else:
            confine.set_oom_score_adj(1000)
        lim = spec["rlimits"]
        mb = 1 << 20
        if lim.get("memory_mb"):
            confine.set_rlimit(resource.RLIMIT_AS, lim["memory_mb"] * mb)
        if lim.get("cpu_s_total"):
            confine.set_rlimit(resource.RLIMIT_CPU, int(lim["cpu_s_total"]), int(lim["cpu_s_total"]) + 1)
        confine.set_rlimit(resource.RLIMIT_FSIZE, lim["max_file_mb"] * mb)
        confine.set_rlimit(resource.RLIMIT_NOFILE, lim["max_open_files"])
        confine.set_rlimit(resource.RLIMIT_CORE, 0)
        confine.set_rlimit(resource.RLIMIT_MSGQUEUE, 0)
        confine.set_rlimit(resource.RLIMIT_MEMLOCK, 64 << 10)
        if lim.get("max_processes"):
            cur = resource.getrlimit(resource.RLIMIT_NPROC)[0]
            if cur == resource.RLIM_INFINITY or cur > lim["max_processes"]:
                confine.set_rlimit(resource.RLIMIT_NPROC, lim["max_processes"])
        confine.capset(int(spec.get("keep_caps", 0)))
        confine.set_no_new_privs()
        if spec.get("landlock"):
            landlock.restrict(spec["ro_paths"], [tmp, *spec.get("rw_paths", [])])
        if spec.get("seccomp"):
            seccomp.install(seccomp.build(os.getpid()))
        confine.set_dumpable(False)
        interp = Interpreter(spec, chan)
    except BaseException as e:  # noqa: BLE001
        if chan is not None:
            try:
                chan.send({"op": "error", "message": f"interpreter setup failed: {type(e).__name__}: {e}"})
            except OSError:
                pass
        os._exit(1)
    interp.hello()
    interp.serve()
