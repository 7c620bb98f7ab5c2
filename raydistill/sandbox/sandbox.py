"""`Sandbox`: an isolated, persistent, forkable Python interpreter for model-written code.

Each Sandbox is a live interpreter process (forked in milliseconds from a warm zygote) plus a forked snapshot
of a committed state and a journal of the steps since, so a step that times out or crashes costs only that
step: a restore forks the snapshot and replays the journal. Cheap steps are journaled rather than snapshotted,
because forking the interpreter costs more CPU than most agent steps do.
All process handling happens on the hub's event loop; the sync methods block only their caller and the
async twins never block the caller's loop.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import itertools
import json
import keyword
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from raydistill.config.sandbox import SandboxConfig, SandboxLimits
from raydistill.sandbox import launch
from raydistill.sandbox.channel import ChannelClosed, ProtocolViolation, make_pair
from raydistill.sandbox.guest.capture import clean, clip
from raydistill.sandbox.hub import Family, Hub, SandboxError, Zygote
from raydistill.sandbox.proc import Proc, SandboxProcessError

log = logging.getLogger("raydistill.sandbox")

RESERVED_NAMES = frozenset({"final_answer", "ToolError", "__builtins__", "__name__", "__doc__"})
RESTORED = "Variables were restored to their state before this step."
RESTARTED = "The interpreter was restarted empty: variables from earlier steps are lost."
_VERSIONS = itertools.count(1)
"""State versions: a box's `version` changes whenever its interpreter's state may change (a step, a fresh
start); a snapshot records the version it copied, so `snapshot.version == box.version` means "identical"."""


JOURNAL_MAX_STEPS = 32
JOURNAL_MAX_BYTES = 1 << 20
"""A journal this long (or this large: code and recorded tool results) forces a snapshot whatever its cost."""


@dataclass(frozen=True)
class _Entry:
    """One committed step as the journal keeps it for replay."""

    step: int
    code: str
    tool_calls: tuple
    """(name, args, kwargs, reply, reply size) of each tool call, in order: replay answers from here, never
    calls tools."""
    outcome: str
    """Digest of what the step showed (stdout, value, error, final answer): a replay must show the same."""
    cost_s: float
    size: int


def _tool_error(message: str) -> tuple[dict, int]:
    return {"op": "tool_result", "ok": False, "error": message}, len(message)


def _outcome_digest(m: dict) -> str:
    keys = ("stdout", "value", "error", "error_type", "is_final", "final_answer")
    return hashlib.blake2b(json.dumps([m.get(k) for k in keys], default=str).encode(), digest_size=16).hexdigest()


@dataclass
class Result:
    """What one `run` produced. `error` is None on success, else the message to show the model."""

    stdout: str = ""
    value: str | None = None
    """repr() of the last expression statement's value (None when there is none or it is None)."""
    error: str | None = None
    is_final: bool = False
    final_answer: Any = None
    duration_s: float = 0.0
    error_type: str | None = None
    """Exception class name, or "timeout" / "crash" / "protocol" / "disk" for failures of the process."""
    restored: bool = False
    """The interpreter process was replaced (from the last snapshot, or fresh) after a hard failure."""
    stdout_truncated: bool = False
    tool_calls: int = 0
    tool_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def make_config(config: SandboxConfig | Mapping | None = None, limits: SandboxLimits | Mapping | None = None,
                **overrides: Any) -> SandboxConfig:
    """SandboxConfig from a config/dict plus keyword overrides (limit names go to `limits`)."""
    base = config.model_dump() if isinstance(config, SandboxConfig) else dict(config or {})
    lim = dict(base.get("limits") or {})
    if limits is not None:
        lim.update(limits.model_dump() if isinstance(limits, SandboxLimits) else dict(limits))
    for k, v in overrides.items():
        if k in SandboxLimits.model_fields:
            lim[k] = v
        elif k in SandboxConfig.model_fields:
            base[k] = v
        else:
            raise TypeError(f"unknown sandbox option {k!r}; config fields: {sorted(SandboxConfig.model_fields)}, "
                            f"limit fields: {sorted(SandboxLimits.model_fields)}")
    base["limits"] = lim
    return SandboxConfig.model_validate(base)


def check_tools(tools: Mapping[str, Callable] | None) -> dict[str, Callable]:
    out = {}
    for name, fn in dict(tools or {}).items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name in RESERVED_NAMES:
            raise ValueError(f"bad tool name {name!r}: must be an identifier other than {sorted(RESERVED_NAMES)}")
        if not callable(fn):
            raise TypeError(f"tool {name!r} is not callable: {fn!r}")
        out[name] = fn
    return out


def _is_async(fn: Callable) -> bool:
    call = type(fn).__call__ if not inspect.isroutine(fn) else None
    return inspect.iscoroutinefunction(fn) or (call is not None and inspect.iscoroutinefunction(call))


async def _await_on(aw, loop: asyncio.AbstractEventLoop | None):
    """Await `aw` on `loop` (the caller's, where its resources live) when that is another running loop."""
    here = asyncio.get_running_loop()
    if loop is None or loop is here or loop.is_closed() or not loop.is_running():
        return await aw

    async def _wrap():
        return await aw

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_wrap(), loop))


class _Snapshot:
    """A forked copy of a committed state, never used to run code; shared (refcounted) by forks.

    It may be a placeholder (proc None, `ready` pending) while the interpreter forks it in the background;
    holders that need the process await `wait()` and find `proc` None if making it failed."""

    def __init__(self, proc: Proc | None, step: int, version: int, loop: asyncio.AbstractEventLoop | None = None):
        self.proc = proc
        self.step = step
        self.version = version
        self.refs = 1
        self.ready: asyncio.Future | None = loop.create_future() if proc is None else None

    @property
    def pending(self) -> bool:
        return self.ready is not None and not self.ready.done()

    @property
    def usable(self) -> bool:
        return self.proc is not None and self.proc.alive

    async def wait(self) -> None:
        if self.pending:
            await asyncio.shield(self.ready)

    def fill(self, proc: Proc, family: Family) -> None:
        """The placeholder's process registered."""
        if self.refs <= 0 or not self.pending:  # every holder let go meanwhile
            family.discard(proc)
            proc.kill()
            proc.close()
        else:
            self.proc = proc
        self.fail()

    def fail(self) -> None:
        """No process will come (or it came): wake the waiters."""
        if self.pending:
            self.ready.set_result(None)

    def acquire(self) -> _Snapshot:
        self.refs += 1
        return self

    def release(self, family: Family | None) -> None:
        self.refs -= 1
        if self.refs <= 0 and self.proc is not None:
            if family is not None:
                family.discard(self.proc)
            self.proc.kill()
            self.proc.close()


class _Box:
    """Hub-side state of one Sandbox. Every method runs on the hub loop."""

    def __init__(self, hub: Hub, cfg: SandboxConfig, tools: dict[str, Callable]):
        self.hub = hub
        self.cfg = cfg
        self.lim = cfg.limits
        self.tools = tools
        self.zygote: Zygote | None = None
        self.family: Family | None = None
        self.active: Proc | None = None
        self.snapshot: _Snapshot | None = None
        self.steps = 0
        self.version = next(_VERSIONS)
        self.closed = False
        self.needs_restore = False
        self.lock: asyncio.Lock | None = None
        self._ready: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._bg: asyncio.Task | None = None
        self._snap_task: asyncio.Task | None = None
        self._snap_missing = False
        self._journal: list[_Entry] = []
        """Steps committed on top of the snapshot (all of them while `_journal_from_empty`)."""
        self._journal_from_empty = True

    # -- creation --------------------------------------------------------------------------------------
    def _init_loop_state(self) -> None:
        self.lock = asyncio.Lock()
        self._ready = asyncio.Event()

    async def create(self) -> None:
        self._init_loop_state()
        try:
            self.zygote = await self.hub.zygote(self.cfg)
            fam, active = await self.zygote.take_family(self._spec(self.zygote), self.cfg.start_timeout_s,
                                                        self.cfg.warm_sandboxes)
            fam.acquire()
            fam.add(active)
            self.family, self.active = fam, active
        except BaseException as e:
            self._error = e if isinstance(e, SandboxError) else SandboxError(f"{type(e).__name__}: {e}")
            raise self._error from None
        finally:
            self._ready.set()

    def adopt(self, parent: _Box, active: Proc) -> None:
        """Become a fork of `parent` (called on the hub loop): same state, so the same snapshot."""
        self._init_loop_state()
        self.zygote, self.family, self.active = parent.zygote, parent.family, active
        self.snapshot = parent.snapshot.acquire() if parent.snapshot is not None else None
        self.steps = parent.steps
        self.version = parent.version
        self._snap_missing = parent._snap_missing
        self._journal = list(parent._journal)
        self._journal_from_empty = parent._journal_from_empty
        self.family.acquire()
        self._ready.set()

    def _spec(self, z: Zygote) -> dict:
        lim = self.lim
        host_frame = 12 * (lim.max_output_chars + 2 * lim.max_value_chars + lim.max_error_chars
                           + lim.max_tool_arg_chars) + (64 << 10)
        return {
            "authorized_imports": list(self.cfg.authorized_imports), "tools": sorted(self.tools),
            "max_output_chars": lim.max_output_chars, "max_value_chars": lim.max_value_chars,
            "max_error_chars": lim.max_error_chars, "max_tool_arg_chars": lim.max_tool_arg_chars,
            "memory_mb": lim.memory_mb,
            "rlimits": {"memory_mb": lim.memory_mb, "cpu_s_total": lim.cpu_s_total, "max_file_mb": lim.max_file_mb,
                        "max_open_files": lim.max_open_files},
            "env": {k: v for k, v in launch.SANDBOX_ENV.items() if k not in ("HOME", "TMPDIR")},
            "seccomp": z.seccomp, "landlock": z.landlock,
            "keep_caps": 1 << 2 if z.info.get("dac_cap") else 0,  # CAP_DAC_READ_SEARCH (root, no userns)
            "ro_paths": list(z.plan.ro_paths) if z.plan else [],
            "max_frame": 12 * (lim.max_code_chars + lim.max_tool_result_chars) + (64 << 10),
            "host_max_frame": host_frame,
            "family": {"tmp_bytes": lim.tmp_size_mb << 20, "tmp_inodes": lim.tmp_inodes,
                       "max_processes": lim.max_processes},
        }

    async def _wait_ready(self) -> None:
        await self._ready.wait()
        if self._error is not None:
            raise self._error
        if self.closed:
            raise SandboxError("the sandbox is closed")

    # -- process management ----------------------------------------------------------------------------
    def _drop(self, p: Proc | None) -> None:
        if p is None:
            return
        p.kill()
        p.close()
        if self.family is not None:
            self.family.discard(p)

    async def _ensure_active(self) -> str | None:
        """Make sure there is a live interpreter; returns a notice when the state had to be rebuilt."""
        if self.active is not None and self.active.alive and not self.needs_restore:
            return None
        self._drop(self.active)
        self.active = None
        self.needs_restore = False
        return await self._restore()

    async def _restore(self) -> str | None:
        """Replace the active interpreter from the snapshot, or fresh from the warden."""
        if self.family is None or self.family.closed or not self.family.warden.alive:
            raise SandboxError("the sandbox was lost (its family of processes is gone)")
        task = self._snap_task
        if task is not None and not task.done():
            await asyncio.shield(task)
        if self.snapshot is not None:
            await self.snapshot.wait()
        snap = self.snapshot
        if snap is not None and snap.usable:
            try:
                (self.active,) = await self._fork_from(snap.proc, "active", 1)
                self.version = snap.version
                if await self._replay([e for e in self._journal if e.step > snap.step]):
                    return None if self._journaling or snap.step == self.steps else (
                        f"The interpreter was restored to its state after step {snap.step} (later state lost).")
                self._drop(self.active)  # the journal no longer applies: back to the snapshot's own state
                self.active = None
                self._journal = []
                (self.active,) = await self._fork_from(snap.proc, "active", 1)
                self.version = snap.version
                return f"The interpreter was restored to its state after step {snap.step} (later state lost)."
            except SandboxError as e:
                log.warning("sandbox: restoring from snapshot failed (%s); starting fresh", e)
                self._drop(self.active)
                self.active = None
        if self.snapshot is not None:
            self.snapshot.release(self.family)
            self.snapshot = None
        journal = self._journal if self._journal_from_empty else []
        for attempt in (journal, []) if journal else ([],):
            try:
                self.active = await self.family.spawn(self.cfg.start_timeout_s)
                self.version = next(_VERSIONS)
            except SandboxError as e:
                raise SandboxError(f"the sandbox was lost (its family of processes is gone: {e})") from None
            if await self._replay(attempt):
                if attempt:
                    return None
                break
            self._drop(self.active)
            self.active = None
        self._journal, self._journal_from_empty = [], True
        return RESTARTED if self.steps else None

    async def _fork_from(self, src: Proc, role: str, n: int, retry: bool = True) -> list[Proc]:
        """Fork `src` n times; the children register on their own channels."""
        fam = self.family
        timeout = self.cfg.start_timeout_s
        pairs = [make_pair() for _ in range(n)]
        fam.begin_fork(src)
        try:
            try:
                async with asyncio.timeout(timeout):
                    await src.chan.send({"op": "fork", "role": role}, [g.fileno() for _, g in pairs])
            finally:
                for _, g in pairs:
                    g.close()
            try:
                ack = await src.next(timeout)
            except (TimeoutError, ChannelClosed, ProtocolViolation) as e:
                for h, _ in pairs:
                    h.close()
                raise SandboxError(f"fork failed: the source process did not answer ({type(e).__name__})") from None
            made = len(ack.get("pids") or []) if ack.get("op") == "forked" else 0
            made = max(0, min(made, n))
            for h, _ in pairs[made:]:
                h.close()
            results = await asyncio.gather(
                *(Proc.accept(h, self.hub.loop, role=role, max_frame=fam.spec["host_max_frame"], timeout=timeout,
                              min_ns_depth=2 if fam.ns else 1) for h, _ in pairs[:made]),
                return_exceptions=True)
            procs = [r for r in results if isinstance(r, Proc)]
            for p in procs:
                fam.add(p)
        finally:
            fam.end_fork(src)
        if len(procs) == n:
            return procs
        for p in procs:
            self._drop(p)
        why = ack.get("errors") or [str(r) for r in results if isinstance(r, BaseException)] or [str(ack)[:200]]
        if retry:  # usually the family's process budget is full of strays: clear them and try once more
            await fam.sweep()
            return await self._fork_from(src, role, n, retry=False)
        raise SandboxError(f"fork failed: {'; '.join(map(str, why))[:500]}")

    # -- running code ----------------------------------------------------------------------------------
    async def run(self, code: str, caller_loop: asyncio.AbstractEventLoop | None) -> Result:
        t0 = time.perf_counter()
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        await self._wait_ready()
        if len(code) > self.lim.max_code_chars:
            return Result(error=f"CodeTooLong: the code has {len(code)} characters; the limit is "
                                f"{self.lim.max_code_chars}.", error_type="CodeTooLong",
                          duration_s=time.perf_counter() - t0)
        await self.lock.acquire()
        handed_off = False
        snap_host = None
        x = None
        try:
            if self.closed:
                raise SandboxError("the sandbox is closed")
            notice = await self._ensure_active()
            if self._snap_missing or (self.snapshot is not None and not self.snapshot.pending
                                      and not self.snapshot.usable):
                await self._settle()
            x = self.active
            self.version = next(_VERSIONS)  # the step may change the state from here on
            fds = []
            if self.cfg.snapshots and not self._journaling:
                snap_host, snap_guest = make_pair()
                fds = [snap_guest.fileno()]
                self.family.begin_fork(x)  # its snapshot child must not be swept before it registers
            msg = {"op": "run", "code": code, "timeout_s": self.lim.step_timeout_s,
                   "cpu_s": self.lim.cpu_s_per_step, "snapshot": "always" if self.cfg.on_error == "keep" else "success"}
            t_send = time.perf_counter()
            try:
                async with asyncio.timeout(self.lim.step_timeout_s):
                    await x.chan.send(msg, fds)
            except (TimeoutError, ChannelClosed):
                pass  # the conversation below sees the dead/stuck process
            finally:
                if fds:
                    snap_guest.close()
            record = [] if self._journaling else None
            outcome, payload, calls, tool_s = await self._converse(x, caller_loop, record=record)
            if outcome == "result":
                res = self._result(payload, t0, calls, tool_s, notice)
                self.steps += 1
                if snap_host is None:  # no snapshot fork in flight (snapshots off, or journaling)
                    if res.error is not None and self.cfg.on_error == "rollback":
                        self.needs_restore = True
                    if record is not None:
                        self._journal.append(_Entry(
                            self.steps, code, tuple(record), _outcome_digest(payload),
                            max(0.0, time.perf_counter() - t_send - tool_s),
                            len(code) + sum(r[4] for r in record)))
                        if self._journal_due():
                            handed_off = True  # _snapshot_in_background releases the lock
                            self._bg = self.hub.loop.create_task(self._snapshot_in_background())
                            return res
                    if self.family.ns:
                        self.family.request_sweep()
                    return res
                handed_off = True  # _after_step ends x's fork mark and releases the lock
                sh, snap_host = snap_host, None
                self._bg = self.hub.loop.create_task(self._after_step(x, sh, self.steps, self.version))
                return res
            # hard failure: the process is killed and replaced
            if snap_host is not None:
                self.family.end_fork(x)
            x, dead = None, x
            self._drop(dead)
            self.active = None
            if outcome == "disk":
                await asyncio.to_thread(_wipe, self.family.tmp_dir)
            note = await self._restore()
            self.family.request_sweep()
            return Result(error=self._failure_message(outcome, payload, note), error_type=outcome, restored=True,
                          duration_s=time.perf_counter() - t0, tool_calls=calls, tool_s=tool_s)
        except BaseException:
            if not handed_off:
                if x is not None and snap_host is not None and self.family is not None:
                    self.family.end_fork(x)
                if self.active is not None:  # interrupted mid-step: the interpreter may be anywhere
                    self.active.kill()
                    self.needs_restore = True
            raise
        finally:
            if snap_host is not None:
                snap_host.close()
            if not handed_off:
                self.lock.release()

    def _failure_message(self, outcome: str, detail: Any, note: str | None) -> str:
        after = note or RESTORED
        if outcome == "timeout":
            return (f"TimeoutError: the code did not finish within {self.lim.step_timeout_s:g} seconds and was "
                    f"stopped. {after}")
        if outcome == "disk":
            return (f"DiskQuotaExceeded: the sandbox's temporary directory grew past {self.lim.tmp_size_mb} MiB; "
                    f"its files were deleted and the code was stopped. {after}")
        if outcome == "protocol":
            return f"SandboxError: the code interfered with the interpreter ({detail}) and was stopped. {after}"
        if outcome == "tool_limit":
            return (f"ToolCallLimit: the code made more than {self.lim.max_tool_calls_per_step} tool calls in one "
                    f"step and was stopped. {after}")
        return ("InterpreterCrash: the Python process running the code died (a crash, os._exit(), a fatal signal, or "
                f"a resource limit such as memory or CPU time). {after}")

    def _result(self, m: dict, t0: float, calls: int, tool_s: float, notice: str | None) -> Result:
        lim = self.lim

        def s(v: Any, cap: int) -> str | None:
            return None if v is None else clip(clean(v if isinstance(v, str) else str(v)), cap + 200)

        fa = m.get("final_answer")
        if not (fa is None or isinstance(fa, bool | int | float)):
            fa = s(fa, lim.max_value_chars)
        elif isinstance(fa, float) and not math.isfinite(fa):
            fa = str(fa)
        err = s(m.get("error"), lim.max_error_chars)
        if notice:
            err = f"{notice}\n{err}" if err else None
        stdout = s(m.get("stdout"), lim.max_output_chars) or ""
        if notice and err is None:
            stdout = f"[{notice}]\n{stdout}"
        chars = m.get("stdout_chars")
        return Result(stdout=stdout, value=s(m.get("value"), lim.max_value_chars), error=err,
                      is_final=bool(m.get("is_final")), final_answer=fa, duration_s=time.perf_counter() - t0,
                      error_type=s(m.get("error_type"), 100) if err else None,
                      stdout_truncated=isinstance(chars, int) and chars > lim.max_output_chars,
                      tool_calls=calls, tool_s=tool_s)

    async def _converse(self, x: Proc, caller_loop, record: list | None = None,
                        replay: list | None = None) -> tuple[str, Any, int, float]:
        """Serve one step: answer tool calls until the result arrives, the budget runs out, or x dies. Tool
        calls are appended to `record`; with `replay` they are answered from it (the same calls in the same
        order, else the outcome is "diverged") instead of calling the tools."""
        budget = self.lim.step_timeout_s + self.lim.kill_grace_s  # the sandbox interrupts itself first
        wall_end = time.monotonic() + self.lim.max_step_wall_s
        used = 0.0
        calls, tool_s = 0, 0.0
        watch_disk = not self.family.ns and self.family.tmp_dir is not None
        while True:
            remaining = budget - used
            if remaining <= 0:
                return "timeout", None, calls, tool_s
            t = time.monotonic()
            try:
                msg = await x.next(min(remaining, 0.25) if watch_disk else remaining)
            except TimeoutError:
                used += time.monotonic() - t
                if watch_disk and await self._over_quota():
                    return "disk", None, calls, tool_s
                continue
            except ChannelClosed:
                return "crash", None, calls, tool_s
            except ProtocolViolation as e:
                return "protocol", str(e), calls, tool_s
            used += time.monotonic() - t
            op = msg.get("op")
            if op == "result":
                if watch_disk and await self._over_quota():
                    return "disk", None, calls, tool_s
                return "result", msg, calls, tool_s
            if op != "tool":
                return "protocol", f"unexpected {str(op)[:40]!r} message", calls, tool_s
            if calls >= self.lim.max_tool_calls_per_step:
                return "tool_limit", None, calls, tool_s
            if time.monotonic() > wall_end:
                return "timeout", None, calls, tool_s
            t1 = time.monotonic()
            call = (msg.get("name"), msg.get("args"), msg.get("kwargs"))
            if replay is not None:
                if not replay or tuple(replay[0][:3]) != call:
                    return "diverged", None, calls, tool_s
                reply = replay.pop(0)[3]
            else:
                reply, nbytes = await self._call_tool(msg, caller_loop)
                if record is not None:
                    record.append((*call, reply, nbytes))
            calls += 1
            tool_s += time.monotonic() - t1
            try:
                async with asyncio.timeout(self.lim.step_timeout_s):
                    await x.chan.send(reply)
            except (TimeoutError, ChannelClosed):
                return "crash", None, calls, tool_s

    async def _over_quota(self) -> bool:
        return await asyncio.to_thread(_usage_exceeds, self.family.tmp_dir, self.lim.tmp_size_mb << 20,
                                       self.lim.tmp_inodes)

    async def _call_tool(self, msg: dict, caller_loop) -> tuple[dict, int]:
        """The reply to send back, and the size of what it carries (the JSON size of the value, or the error's
        length), which the journal counts."""
        name, args, kwargs = msg.get("name"), msg.get("args"), msg.get("kwargs")
        if not isinstance(name, str) or name not in self.tools:
            return _tool_error(f"unknown tool {str(name)[:80]!r}")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return _tool_error("malformed tool call")
        fn = self.tools[name]
        try:
            value = await asyncio.wait_for(self._invoke(fn, args, kwargs, caller_loop), self.lim.tool_timeout_s)
        except TimeoutError:
            return _tool_error(f"{name} did not answer within {self.lim.tool_timeout_s:g} seconds")
        except Exception as e:  # noqa: BLE001 - tool failures are reported to the model, not raised
            return _tool_error(clip(f"{name} failed: {type(e).__name__}: {e}", 2000))
        if isinstance(value, str):
            value = clip(value, self.lim.max_tool_result_chars)
        try:
            size = len(json.dumps(value))
        except (TypeError, ValueError):
            log.warning("sandbox tool %r returned a non-JSON value of type %s", name, type(value).__name__)
            return _tool_error(f"{name} returned a {type(value).__name__}, which cannot be passed into the sandbox")
        if size > 12 * self.lim.max_tool_result_chars:
            return _tool_error(f"{name} returned too much data ({size} bytes)")
        return {"op": "tool_result", "ok": True, "value": value}, size

    async def _invoke(self, fn: Callable, args: list, kwargs: dict, caller_loop) -> Any:
        if _is_async(fn):
            return await _await_on(fn(*args, **kwargs), caller_loop)
        res = await self.hub.loop.run_in_executor(self.hub.tool_executor, functools.partial(fn, *args, **kwargs))
        if inspect.isawaitable(res):
            res = await _await_on(res, caller_loop)
        return res

    async def _after_step(self, x: Proc, snap_host, step: int, version: int,
                          placeholder: _Snapshot | None = None) -> None:
        """Wrap up a completed step (or a fork that gave the snapshot away) while the caller already has its
        result. Holds the box lock only until the interpreter confirms it forked its snapshot (it cannot start
        the next step before that anyway); registering the snapshot (into `placeholder` when given) and
        sweeping strays continue in the background."""
        fam = self.family
        marked = True  # the caller marked x as forking
        adopting = False
        try:
            try:
                ack = await x.next(self.cfg.start_timeout_s)
            except (ChannelClosed, ProtocolViolation, TimeoutError):
                ack = {}
            if ack.get("op") != "forked":
                self.needs_restore = True
                return
            if ack.get("skipped"):  # on_error="rollback" and the step raised: back to the previous state
                fam.end_fork(x)
                marked = False
                self._drop(x)
                self.active = None
                await self._restore()
                return
            if ack.get("ok"):
                self._snap_task = self.hub.loop.create_task(self._adopt(x, snap_host, step, version, placeholder))
                snap_host, marked, adopting = None, False, True
                return
            # the fork failed inside the interpreter (usually: process budget full of strays)
            fam.end_fork(x)
            marked = False
            await self._resnapshot(x)
        except asyncio.CancelledError:
            self.needs_restore = True
        except Exception as e:  # noqa: BLE001 - never let a background task die silently
            log.warning("sandbox: post-step bookkeeping failed: %s: %s", type(e).__name__, e)
            self.needs_restore = True
        finally:
            if snap_host is not None:
                snap_host.close()
            if marked and fam is not None:
                fam.end_fork(x)
            if placeholder is not None and not adopting:
                placeholder.fail()  # holders of the placeholder see no process and make their own
            self.lock.release()
            if not adopting and fam is not None and fam.ns and not self.closed:
                fam.request_sweep()

    async def _adopt(self, x: Proc, snap_host, step: int, version: int, placeholder: _Snapshot | None) -> None:
        """Register the snapshot the interpreter forked (runs concurrently with the next step)."""
        fam = self.family
        try:
            proc = await Proc.accept(snap_host, self.hub.loop, role="snapshot", max_frame=fam.spec["host_max_frame"],
                                     timeout=self.cfg.start_timeout_s, min_ns_depth=2 if fam.ns else 1)
            fam.add(proc)
            if placeholder is not None:
                placeholder.fill(proc, fam)
                if placeholder.proc is proc and self.snapshot is placeholder:
                    self._journal_covered(step)
                self._snap_missing = False
                return
            if self.closed or (self.snapshot is not None and self.snapshot.version > version):
                self._drop(proc)  # closed meanwhile, or a later step's snapshot registered first
                return
            self._set_snapshot(proc, step, version)
            self._snap_missing = False
        except (SandboxProcessError, asyncio.CancelledError):
            self._snap_missing = True  # redone under the lock before the state is needed
        finally:
            if placeholder is not None:
                placeholder.fail()
            fam.end_fork(x)
            if fam.ns and not self.closed:
                fam.request_sweep()

    def _set_snapshot(self, proc: Proc, step: int, version: int) -> None:
        old, self.snapshot = self.snapshot, _Snapshot(proc, step, version)
        if old is not None:
            old.release(self.family)
        self._journal_covered(step)

    def _journal_covered(self, step: int) -> None:
        """The snapshot now holds the state after `step`: the journal keeps only what came later."""
        self._journal = [e for e in self._journal if e.step > step]
        self._journal_from_empty = False

    @property
    def _journaling(self) -> bool:
        return self.cfg.snapshots and self.cfg.on_error == "keep" and self.cfg.replay_budget_s > 0

    def _journal_due(self) -> bool:
        """Replaying the journal would now take too long (or it grew too big): time for a snapshot."""
        base = self.snapshot.step if self.snapshot is not None else -1
        tail = [e for e in self._journal if e.step > base]
        return (len(tail) >= JOURNAL_MAX_STEPS or sum(e.size for e in tail) >= JOURNAL_MAX_BYTES
                or sum(e.cost_s for e in tail) >= self.cfg.replay_budget_s)

    async def _snapshot_in_background(self) -> None:
        """Snapshot the state the caller already has the result of (lock held; released here)."""
        try:
            if self.active is not None and self.active.alive:
                await self._resnapshot(self.active)
        except asyncio.CancelledError:
            pass  # closing: nothing to keep
        except Exception as e:  # noqa: BLE001 - never let a background task die silently
            log.warning("sandbox: snapshot after step %d failed: %s: %s", self.steps, type(e).__name__, e)
        finally:
            self.lock.release()
            if self.family is not None and self.family.ns and not self.closed:
                self.family.request_sweep()

    async def _replay(self, entries: list[_Entry]) -> bool:
        """Re-run journaled steps on the new active interpreter; False (the caller discards it) as soon as one
        fails or shows another outcome than it did the first time."""
        for e in entries:
            x = self.active
            self.version = next(_VERSIONS)
            msg = {"op": "run", "code": e.code, "timeout_s": self.lim.step_timeout_s, "cpu_s": self.lim.cpu_s_per_step}
            try:
                async with asyncio.timeout(self.lim.step_timeout_s):
                    await x.chan.send(msg)
            except (TimeoutError, ChannelClosed):
                return False
            replies = list(e.tool_calls)
            outcome, payload, _, _ = await self._converse(x, None, replay=replies)
            if outcome != "result" or replies or _outcome_digest(payload) != e.outcome:
                log.info("sandbox: replaying step %d diverged (%s); falling back to an older state", e.step, outcome)
                return False
        return True

    async def _resnapshot(self, x: Proc) -> None:
        """Snapshot the (idle) interpreter now; called with the box lock held."""
        try:
            (proc,) = await self._fork_from(x, "snapshot", 1)
            self._set_snapshot(proc, self.steps, self.version)
            self._snap_missing = False
        except SandboxError as e:
            self._snap_missing = True
            log.warning("sandbox: could not snapshot step %d (%s); a crash now restores an older state", self.steps, e)

    async def _settle(self) -> None:
        """Make the snapshot current (lock held): wait for a pending registration, redo a failed one."""
        task = self._snap_task
        if task is not None and not task.done():
            await asyncio.shield(task)
        snap = self.snapshot
        if snap is not None:
            await snap.wait()
        lost = snap is not None and not snap.usable
        if (self._snap_missing or lost) and self.active is not None and self.active.alive and self.cfg.snapshots:
            await self._resnapshot(self.active)

    # -- forking and closing ---------------------------------------------------------------------------
    async def fork(self, n: int) -> list[_Box]:
        await self._wait_ready()
        await self.lock.acquire()
        handed_off = False
        try:
            if self.closed:
                raise SandboxError("the sandbox is closed")
            await self._ensure_active()
            await self._settle()
            snap = self.snapshot
            if n == 1 and snap is not None and snap.usable and snap.refs == 1 and snap.version == self.version:
                handed_off = True  # _after_step releases the lock
                return [await self._fork_by_takeover(snap)]
            procs = await self._fork_from(self.active, "active", n)
            boxes = []
            for p in procs:
                b = _Box(self.hub, self.cfg, self.tools)
                b.adopt(self, p)
                boxes.append(b)
            return boxes
        finally:
            if not handed_off:
                self.lock.release()

    async def _fork_by_takeover(self, snap: _Snapshot) -> _Box:
        """The fast fork (lock held; released by the background part): the snapshot already is a forked copy
        of exactly this state, registered and confined, so it becomes the child's interpreter at once. The
        parent then forks a new snapshot in the background, which parent and child share (as forks do) --
        the fork's process work leaves the critical path."""
        proc = snap.proc
        snap.proc = None  # ours now: releasing the old record must not kill it
        snap.release(self.family)
        x = self.active
        placeholder = _Snapshot(None, self.steps, self.version, self.hub.loop)
        self.snapshot = placeholder
        snap_host, snap_guest = make_pair()
        self.family.begin_fork(x)
        proc.role = proc.chan.name = "active"
        try:
            await proc.chan.send({"op": "activate"})
        except ChannelClosed:
            proc.kill()  # the child restores from the new snapshot on its first step
        try:
            await x.chan.send({"op": "fork", "role": "snapshot"}, [snap_guest.fileno()])
        except ChannelClosed:
            pass  # _after_step sees the dead process
        finally:
            snap_guest.close()
        self._bg = self.hub.loop.create_task(self._after_step(x, snap_host, self.steps, self.version, placeholder))
        child = _Box(self.hub, self.cfg, self.tools)
        child.adopt(self, proc)
        return child

    async def close(self) -> None:
        if self._ready is None:
            return
        await self._ready.wait()
        if self.closed or self._error is not None:
            return
        for task in (self._bg, self._snap_task):
            if task is not None and not task.done():
                task.cancel()
        async with self.lock:
            if self.closed:
                return
            self.closed = True
            self._drop(self.active)
            self.active = None
            if self.snapshot is not None:
                self.snapshot.release(self.family)
                self.snapshot = None
            fam, self.family = self.family, None
            fam.request_sweep()
            await fam.release()

    def info(self) -> dict:
        d = self.zygote.details() if self.zygote is not None else {}
        d.update(steps=self.steps, pid=self.active.pid if self.active else None,
                 snapshot_pid=self.snapshot.proc.pid if self.snapshot and self.snapshot.proc else None,
                 warden_pid=self.family.warden.pid if self.family else None, journal_steps=len(self._journal))
        return d


def _usage_exceeds(path: str | None, max_bytes: int, max_entries: int) -> bool:
    """Disk use of the fallback temp dir (no tmpfs cap there): bytes or entries over the limit."""
    if not path:
        return False
    total, entries, stack = 0, 0, [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    entries += 1
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    if total > max_bytes or entries > max_entries:
                        return True
        except OSError:
            continue
    return False


def _wipe(path: str | None) -> None:
    import shutil

    if not path:
        return
    try:
        with os.scandir(path) as it:
            for e in list(it):
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    try:
                        os.unlink(e.path)
                    except OSError:
                        pass
    except OSError:
        pass


class Sandbox:
    """An isolated persistent Python interpreter. Construction returns at once (the interpreter starts in the
    background); the first call waits for it.

        with Sandbox(tools={"web_search": fn}) as sb:
            r = sb.run("x = 2\\nx * 21")          # r.value == "42"
            child = sb.fork()                   # independent copy of the state
        r = await sb.arun(code); child = await sb.afork()
    """

    def __init__(self, tools: Mapping[str, Callable] | None = None, *, config: SandboxConfig | Mapping | None = None,
                 limits: SandboxLimits | Mapping | None = None, **overrides: Any):
        cfg = make_config(config, limits, **overrides)
        self._hub = Hub.get()
        self._box = _Box(self._hub, cfg, check_tools(tools))
        self._created = self._hub.submit(self._box.create())
        self._closed = False

    @classmethod
    def _wrap(cls, hub: Hub, box: _Box) -> Sandbox:
        sb = cls.__new__(cls)
        sb._hub, sb._box, sb._closed = hub, box, False
        sb._created = None
        return sb

    @property
    def config(self) -> SandboxConfig:
        return self._box.cfg

    # -- readiness / info ------------------------------------------------------------------------------
    def ready(self, timeout: float | None = None) -> Sandbox:
        """Block until the interpreter is up (raises SandboxError if it cannot start)."""
        if self._created is not None:
            self._created.result(timeout)
        return self

    async def aready(self) -> Sandbox:
        if self._created is not None:
            await asyncio.wrap_future(self._created)
        return self

    @property
    def isolation_level(self) -> str:
        """"bwrap" (namespaces + seccomp + rlimits), "seccomp" (seccomp + Landlock + rlimits) or "rlimits"."""
        self.ready()
        return self._box.zygote.level

    @property
    def isolation(self) -> dict:
        """Which layers are active (level, namespaces, seccomp, landlock_abi, uid, ...) and process ids."""
        self.ready()
        return self._hub.call(_call(self._box.info))

    # -- the API ---------------------------------------------------------------------------------------
    def run(self, code: str) -> Result:
        return self._hub.call(self._box.run(code, None))

    async def arun(self, code: str) -> Result:
        return await self._hub.acall(self._box.run(code, asyncio.get_running_loop()))

    def fork(self) -> Sandbox:
        (box,) = self._hub.call(self._box.fork(1))
        return Sandbox._wrap(self._hub, box)

    async def afork(self) -> Sandbox:
        (box,) = await self._hub.acall(self._box.fork(1))
        return Sandbox._wrap(self._hub, box)

    def fork_many(self, n: int) -> list[Sandbox]:
        """n independent copies in one round trip (e.g. sag candidates)."""
        return [Sandbox._wrap(self._hub, b) for b in self._hub.call(self._box.fork(int(n)))]

    async def afork_many(self, n: int) -> list[Sandbox]:
        return [Sandbox._wrap(self._hub, b) for b in await self._hub.acall(self._box.fork(int(n)))]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub.call(self._box.close())

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._hub.acall(self._box.close())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __del__(self) -> None:
        try:
            if not self._closed and not self._hub.closing and self._hub.thread.is_alive():
                self._closed = True
                self._hub.submit(self._box.close())
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __reduce__(self):
        raise TypeError("a Sandbox holds live processes and cannot be pickled; on Ray use "
                        "raydistill.actors.sandbox_pool.SandboxPool handles")

    def __repr__(self) -> str:
        return f"<Sandbox steps={self._box.steps} closed={self._closed}>"


async def _call(fn: Callable):
    return fn()
