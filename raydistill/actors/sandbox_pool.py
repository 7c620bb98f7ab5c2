"""Sandboxes on Ray: a pool of `SandboxHost` actors on CPU nodes, each holding many sandboxes.

    pool = SandboxPool(cfg.sandbox)                      # N actors, fractional num_cpus each
    sb = await pool.create(tools={"web_search": tool})   # a handle; picklable, usable from any worker
    r = await sb.arun("x = 1\\nx + 1"); child = await sb.afork(); await sb.aclose()

Sticky: a handle names its actor, and every call (and every fork, which lives next to its parent's
state) goes to that actor. Tools run in the actor process, outside the sandbox: pass plain callables
(sync or async), Ray actor methods (`retriever.search`), or `RayActorTool(handle, "method")`. A tools
mapping (the same names bound to the same objects) is shipped to each actor once per pool object in a process
and named by a key after that: pickling a tool closure with its actor handle cost the caller's event loop ~0.7
ms per create, more than the call itself (docs/sandbox.md). Pool and hosts remember the last `MAX_TOOLSETS`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray

from raydistill.config.sandbox import SandboxConfig
from raydistill.sandbox import Result, Sandbox, SandboxError, make_config

log = logging.getLogger(__name__)


_SUBMITTER: ThreadPoolExecutor | None = None


def _submitter() -> ThreadPoolExecutor:
    global _SUBMITTER
    if _SUBMITTER is None:
        _SUBMITTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raydistill-submit")
    return _SUBMITTER


async def acall(method: Any, *args: Any) -> Any:
    """`await method.remote(*args)`, with the Ray submission made on a helper thread.

    Why: the teacher actor's event loop also runs vLLM's output handler, and the GPU generate benchmark saw
    ~14% of that loop's samples in Ray's `submit_actor_task`. Submitting here cut the loop's CPU per pooled
    step from 0.74-0.83 to 0.29 ms on the 2-core dev box (`benchmarks/sandbox_calls.py`). The
    helper thread submits and registers the completion callback; the loop pays a queue put and one
    `call_soon_threadsafe` when the result arrives. One thread per process keeps submissions in order."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(cf: Future) -> None:  # on the loop
        if fut.done():  # the caller was cancelled
            return
        exc = cf.exception()
        if exc is None:
            fut.set_result(cf.result())
        else:
            fut.set_exception(exc)

    def hand_back(cf: Future) -> None:  # on whichever thread completed cf
        try:
            loop.call_soon_threadsafe(settle, cf)
        except RuntimeError:  # the loop closed meanwhile: nobody waits
            pass

    def submit() -> None:  # on the helper thread
        cf: Future = Future()
        try:
            cf = method.remote(*args).future()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            cf.set_exception(e)
        cf.add_done_callback(hand_back)

    _submitter().submit(submit)
    return await fut


class RayActorTool:
    """A picklable tool that calls `handle.<method>.remote(...)` and awaits the result (never blocks)."""

    def __init__(self, handle: Any, method: str):
        self.handle = handle
        self.method = method

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self.handle, self.method).remote(*args, **kwargs)

    def __repr__(self) -> str:
        return f"RayActorTool({self.method})"


def _adapt_tool(fn: Any) -> Callable:
    """Ray remote functions / actor methods become awaiting callables; everything else is used as is."""
    if callable(fn) and not hasattr(fn, "remote"):
        return fn
    if hasattr(fn, "remote"):

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await fn.remote(*args, **kwargs)

        return call
    raise TypeError(f"tool {fn!r} is neither callable nor a Ray remote method")


MAX_TOOLSETS = 64
"""Tool mappings a pool (per process) and a host remember; callers normally use one or two."""


class UnknownToolsError(SandboxError):
    """The actor does not hold this tools key (it restarted since it was registered): register again."""


@ray.remote(max_restarts=3)
class SandboxHost:
    """Holds sandboxes by id; every method is async so one actor serves hundreds of episodes at once."""

    def __init__(self, config: dict):
        self.cfg = SandboxConfig.model_validate(config)
        self.boxes: dict[str, Sandbox] = {}
        self.last_used: dict[str, float] = {}
        self.toolsets: dict[str, dict[str, Callable]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._reaper: asyncio.Task | None = None

    def _ensure_loop_state(self) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.pool.max_sandboxes_per_actor)
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())

    def _get(self, sid: str) -> Sandbox:
        sb = self.boxes.get(sid)
        if sb is None:
            raise SandboxError(f"sandbox {sid} is not on this actor (closed, reaped when idle, or the actor restarted)")
        self.last_used[sid] = time.monotonic()
        return sb

    async def _add(self, sb: Sandbox) -> str:
        await self._slots.acquire()
        sid = uuid.uuid4().hex
        self.boxes[sid] = sb
        self.last_used[sid] = time.monotonic()
        return sid

    async def add_tools(self, key: str, tools: Mapping[str, Any]) -> None:
        self.toolsets[key] = {k: _adapt_tool(v) for k, v in dict(tools).items()}
        while len(self.toolsets) > MAX_TOOLSETS:  # oldest first; a create naming it gets UnknownToolsError
            del self.toolsets[next(iter(self.toolsets))]

    async def create(self, tools: Mapping[str, Any] | None = None, tools_key: str | None = None
                     ) -> tuple[str, dict]:
        self._ensure_loop_state()
        if tools_key is not None:
            if tools_key not in self.toolsets:
                raise UnknownToolsError(f"tools {tools_key} are not registered on this actor")
            adapted = self.toolsets[tools_key]
        else:
            adapted = {k: _adapt_tool(v) for k, v in dict(tools or {}).items()}
        sb = Sandbox(tools=adapted, config=self.cfg)
        try:
            await sb.aready()
        except BaseException:
            await sb.aclose()
            raise
        sid = await self._add(sb)
        return sid, {"isolation_level": sb.isolation_level}

    async def run(self, sid: str, code: str) -> Result:
        return await self._get(sid).arun(code)

    async def fork(self, sid: str, n: int = 1) -> list[str]:
        self._ensure_loop_state()
        children = await self._get(sid).afork_many(n)
        return [await self._add(c) for c in children]

    async def close(self, sid: str) -> None:
        sb = self.boxes.pop(sid, None)
        self.last_used.pop(sid, None)
        if sb is not None:
            self._slots.release()
            await sb.aclose()

    async def stats(self) -> dict:
        return {"sandboxes": len(self.boxes), "toolsets": len(self.toolsets),
                "node": ray.get_runtime_context().get_node_id()}

    async def _reap_idle(self) -> None:
        ttl = self.cfg.pool.idle_timeout_s
        while True:
            await asyncio.sleep(min(60.0, ttl / 4))
            now = time.monotonic()
            for sid, t in list(self.last_used.items()):
                if now - t > ttl:
                    log.warning("closing sandbox %s: idle for %.0f s (leaked handle?)", sid, now - t)
                    await self.close(sid)


class SandboxHandle:
    """A sandbox living in a SandboxHost actor; same interface as `Sandbox` (async and sync)."""

    def __init__(self, actor: Any, sid: str, info: dict):
        self.actor = actor
        self.sid = sid
        self.info = info
        self._closed = False

    @property
    def isolation_level(self) -> str:
        return self.info.get("isolation_level", "")

    async def arun(self, code: str) -> Result:
        return await acall(self.actor.run, self.sid, code)

    async def afork(self) -> SandboxHandle:
        (child,) = await self.afork_many(1)
        return child

    async def afork_many(self, n: int) -> list[SandboxHandle]:
        return [SandboxHandle(self.actor, s, self.info) for s in await acall(self.actor.fork, self.sid, int(n))]

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await acall(self.actor.close, self.sid)

    def run(self, code: str) -> Result:
        return ray.get(self.actor.run.remote(self.sid, code))

    def fork(self) -> SandboxHandle:
        (sid,) = ray.get(self.actor.fork.remote(self.sid, 1))
        return SandboxHandle(self.actor, sid, self.info)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            ray.get(self.actor.close.remote(self.sid))

    async def __aenter__(self) -> SandboxHandle:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<SandboxHandle {self.sid[:8]} on {self.actor}>"


class SandboxPool:
    """N SandboxHost actors (fractional CPUs); `create` spreads new sandboxes over them. Picklable, so the
    pool object can be handed to Ray Data workers / Serve replicas that each create their own sandboxes."""

    def __init__(self, config: SandboxConfig | Mapping | None = None, *, num_actors: int | None = None,
                 num_cpus_per_actor: float | None = None, **overrides: Any):
        self.config = make_config(config, **overrides)
        n = num_actors or self.config.pool.num_actors
        cpus = self.config.pool.num_cpus_per_actor if num_cpus_per_actor is None else num_cpus_per_actor
        self.actors = [SandboxHost.options(num_cpus=cpus, max_concurrency=10_000).remote(self.config.model_dump())
                       for _ in range(n)]
        self._next = itertools.count(random.randrange(n))
        self._toolsets: dict[tuple, tuple[list, str, dict[int, list]]] = {}

    def __getstate__(self) -> dict:
        return {"config": self.config.model_dump(), "actors": self.actors}

    def __setstate__(self, state: dict) -> None:
        self.config = SandboxConfig.model_validate(state["config"])
        self.actors = state["actors"]
        self._next = itertools.count(random.randrange(len(self.actors)))
        self._toolsets = {}

    def _pick_index(self) -> int:
        return next(self._next) % len(self.actors)

    def _pick(self) -> Any:
        return self.actors[self._pick_index()]

    @staticmethod
    def _tools_ident(tools: Mapping[str, Any]) -> tuple:
        """Same names bound to the same objects = same tools, even in a new dict."""
        return tuple(sorted((k, id(v)) for k, v in tools.items()))

    async def _register(self, i: int, tools: Mapping[str, Any], stale: Any = None) -> tuple[str, Any]:
        """Ship `tools` to actor i once; returns their key and the registration. Concurrent creates await the
        same registration (an ObjectRef can be awaited any number of times, from any loop); `stale`: one the
        actor no longer holds (it restarted), replaced once however many creates saw it fail."""
        ident = self._tools_ident(tools)
        entry = self._toolsets.get(ident)
        if entry is None:  # the entry keeps the tool objects alive, so their ids are not reused
            entry = self._toolsets[ident] = (list(tools.values()), uuid.uuid4().hex, {})
            while len(self._toolsets) > MAX_TOOLSETS:
                del self._toolsets[next(iter(self._toolsets))]
        _, key, regs = entry
        slot = regs.get(i)  # [registration ref, known done]
        if slot is None or slot[0] is stale:
            slot = regs[i] = [self.actors[i].add_tools.remote(key, dict(tools)), False]
        if not slot[1]:  # awaiting even a finished ObjectRef is a trip through Ray's core worker
            try:
                await slot[0]
            except Exception:
                if regs.get(i) is slot:
                    del regs[i]  # the next create tries again
                raise
            slot[1] = True
        return key, slot[0]

    async def create(self, tools: Mapping[str, Any] | None = None) -> SandboxHandle:
        i = self._pick_index()
        actor = self.actors[i]
        if not tools:
            sid, info = await acall(actor.create, {})
            return SandboxHandle(actor, sid, info)
        key, ref = await self._register(i, tools)
        try:
            sid, info = await acall(actor.create, None, key)
        except UnknownToolsError:  # the actor restarted since and lost them: register once more
            key, _ = await self._register(i, tools, stale=ref)
            sid, info = await acall(actor.create, None, key)
        return SandboxHandle(actor, sid, info)

    acquire = create

    def create_sync(self, tools: Mapping[str, Any] | None = None) -> SandboxHandle:
        actor = self._pick()
        sid, info = ray.get(actor.create.remote(dict(tools or {})))
        return SandboxHandle(actor, sid, info)

    async def stats(self) -> list[dict]:
        return list(await asyncio.gather(*(a.stats.remote() for a in self.actors)))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
