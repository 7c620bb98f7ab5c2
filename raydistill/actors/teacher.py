"""The teacher worker: a Ray Data `map_batches` callable class that turns question rows into trajectories.

One actor holds ONE engine (`create_engine(cfg.teacher)`: vLLM on its GPUs, transformers on CPU, or an
OpenAI-compatible endpoint) and runs many episodes at once on one event loop, so the engine always sees a
full batch; several Ray Data batches run on one actor at a time (async UDF), sharing a cap of
`generate.episodes_per_worker` concurrent episodes. Code steps go to the sandbox actor pool (sticky handles)
and `web_search` to the retriever actors.

Durability: finished episodes are written by the actor itself as small atomic Parquet shards (every
`generate.shard_rows` episodes or `generate.flush_interval_s` seconds, and always before a batch returns), so
a batch is reported done only when all of its rows are on disk. If the actor dies mid-batch, Ray restarts it
and re-runs the batch (`max_restarts`/`max_task_retries`); the re-run skips every (id, sample) already on
disk, so finished work is neither lost nor duplicated. Any failure inside one episode becomes a recorded
failed trajectory (`Trajectory.error`), never a failed batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raydistill.agent.trajectory import Trajectory
from raydistill.config import RootConfig
from raydistill.curation.filter import grade_trajectory, rejection_reasons
from raydistill.curation.store import TrajectoryStore

log = logging.getLogger(__name__)

STAT_COLUMNS = ("id", "sample", "source", "correct", "reason", "steps", "prompt_tokens", "completion_tokens",
                "gen_s", "exec_s", "code_steps", "duration_s", "skipped")


RUN_TOKEN_FILE = "RUN"


class SupersededError(RuntimeError):
    """A newer generate run took over the output directory."""


def read_run_token(directory: Any) -> str | None:
    try:
        return (Path(directory) / RUN_TOKEN_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def write_run_token(directory: Any) -> str:
    """Claim `directory` for a new run; writers of older runs stop writing (see TeacherWorker._write)."""
    token = uuid.uuid4().hex
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".tmp-{RUN_TOKEN_FILE}-{token}"
    tmp.write_text(token)
    os.replace(tmp, d / RUN_TOKEN_FILE)
    return token


def episode_seed(seed: int, qid: str, sample: int) -> int:
    """A stable per-(question, sample) seed: reruns and resumed runs sample the same way."""
    h = hashlib.sha256(f"{seed}:{qid}:{sample}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def failed_trajectory(row: dict[str, Any], kind: str, error: str, engine: str = "", model: str = "") -> Trajectory:
    """The record kept for an episode that could not run at all (so the key is done and the reason is seen)."""
    return Trajectory(id=row["id"], sample=int(row["sample"]), source=row.get("source") or "",
                      domain=row.get("domain") or "math", question=row["question"], gold=list(row.get("gold") or []),
                      kind=kind, error=error, engine=engine, model=model)


def stat_row(t: Trajectory, skipped: bool = False) -> dict[str, Any]:
    reasons = [] if skipped else rejection_reasons(t)
    return {
        "id": t.id, "sample": t.sample, "source": t.source, "correct": bool(t.correct),
        "reason": reasons[0] if reasons else "", "steps": t.num_steps,
        "prompt_tokens": sum(s.prompt_tokens for s in t.steps),
        "completion_tokens": sum(s.completion_tokens for s in t.steps),
        "gen_s": sum(s.gen_s for s in t.steps), "exec_s": sum(s.exec_s for s in t.steps),
        "code_steps": sum(1 for s in t.steps if s.code), "duration_s": t.duration_s, "skipped": skipped,
    }


class TeacherWorker:
    """`ds.map_batches(TeacherWorker, fn_constructor_kwargs=dict(cfg=cfg, kind=..., out_dir=...))`.

    cfg: the RootConfig (or its dict). kind: "agent" or "cot". out_dir: the trajectory shard directory.
    sandbox_pool: a `raydistill.actors.sandbox_pool.SandboxPool` (agent kind): each episode gets a sticky
        sandbox handle from it. None runs sandboxes inside this actor instead.
    web_search: the picklable tool (`raydistill.actors.retriever.make_web_search_tool(handle)`), run by the
        sandbox host on behalf of the code; None when retrieval is off.
    """

    def __init__(self, cfg: RootConfig | dict[str, Any], kind: str, out_dir: str, sandbox_pool: Any = None,
                 web_search: Callable | None = None, run_token: str | None = None) -> None:
        from raydistill.engines import create_engine

        if kind not in ("agent", "cot"):
            raise ValueError(f"kind must be 'agent' or 'cot', got {kind!r}")
        self.cfg = cfg if isinstance(cfg, RootConfig) else RootConfig.model_validate(cfg)
        self.kind = kind
        self.store = TrajectoryStore(out_dir)
        self.run_token = run_token
        self.sandbox_pool = sandbox_pool
        self.tools: dict[str, Callable] = {"web_search": web_search} if web_search is not None else {}
        self.tag = uuid.uuid4().hex[:6]
        self.engine = self._create_engine(create_engine)
        self._sem: asyncio.Semaphore | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._pending: list[Trajectory] = []
        self._pending_since: float | None = None
        self._flusher: asyncio.Task | None = None
        self.episodes_run = 0
        log.info("teacher worker %s (pid %d) up: %s, kind=%s", self.tag, os.getpid(), self.engine.describe(), kind)

    def _create_engine(self, create_engine: Callable) -> Any:
        t = self.cfg.teacher
        if t.backend == "vllm" and t.tensor_parallel_size > 1 and "distributed_executor_backend" not in t.engine_kwargs:
            # This actor already holds all N GPUs; vLLM's default inside Ray would ask Ray for N more.
            t = t.model_copy(update={"engine_kwargs": {**t.engine_kwargs, "distributed_executor_backend": "mp"}})
        return create_engine(t)

    # -- durability ----------------------------------------------------------------------------------
    def _ensure_loop_objects(self) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.cfg.generate.episodes_per_worker)
            self._flush_lock = asyncio.Lock()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._periodic_flush())

    async def _periodic_flush(self) -> None:
        interval = self.cfg.generate.flush_interval_s
        while True:
            await asyncio.sleep(max(interval, 0.5))
            if self._pending_since is not None and time.monotonic() - self._pending_since >= interval:
                try:
                    await self._flush()
                except Exception as e:  # the batch-end flush raises for real; here we only retry later
                    log.warning("periodic flush failed (will retry): %s", e)

    async def _add(self, traj: Trajectory) -> None:
        self._pending.append(traj)
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        g = self.cfg.generate
        if len(self._pending) >= g.shard_rows or time.monotonic() - self._pending_since >= g.flush_interval_s:
            await self._flush()

    async def _flush(self) -> None:
        """Write everything pending as one shard. On failure the rows stay pending and the error propagates."""
        assert self._flush_lock is not None
        async with self._flush_lock:
            items, self._pending, since = self._pending, [], self._pending_since
            self._pending_since = None
            if not items:
                return
            try:
                await asyncio.to_thread(self._write, items)
            except BaseException:
                self._pending = items + self._pending
                self._pending_since = since
                raise

    def _write(self, items: list[Trajectory]) -> None:
        if self.run_token is not None and read_run_token(self.store.dir) != self.run_token:
            # A newer run owns this directory (this actor outlived a killed driver): writing could duplicate
            # rows that run is making, so stop instead.
            raise SupersededError(f"{self.store.dir} now belongs to a newer generate run; not writing")
        self.store.write(items, self.tag)

    # -- episodes ------------------------------------------------------------------------------------
    def _temperature(self) -> float | None:
        return self.cfg.generate.sample_temperature if self.cfg.generate.samples_per_question > 1 else None

    async def _sandbox(self) -> Any:
        if self.sandbox_pool is None:
            return None  # run_episode makes a local Sandbox with self.tools
        return await self.sandbox_pool.create(tools=self.tools)

    async def run_one(self, row: dict[str, Any]) -> Trajectory:
        """One episode (or CoT answer) for one row; never raises except on cancellation."""
        from raydistill.agent import run_cot, run_episode

        seed = episode_seed(self.cfg.seed, row["id"], int(row["sample"]))
        record = {"id": row["id"], "question": row["question"], "answer": list(row.get("gold") or []),
                  "domain": row.get("domain"), "source": row.get("source")}
        try:
            if self.kind == "cot":
                traj = await run_cot(self.engine, record, self.cfg.agent, sample=int(row["sample"]), seed=seed,
                                     temperature=self._temperature(),
                                     max_tokens=self.cfg.generate.cot_max_new_tokens)
            else:
                sandbox = await self._sandbox()
                traj = await run_episode(self.engine, sandbox, record, self.cfg.agent, role="teacher",
                                         tools=self.tools if sandbox is None else list(self.tools),
                                         sample=int(row["sample"]), seed=seed, temperature=self._temperature())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # anything the episode itself did not turn into a recorded failure
            log.warning("episode %s/%s crashed: %s: %s", row["id"], row["sample"], type(e).__name__, e)
            traj = failed_trajectory(row, self.kind, f"worker: {type(e).__name__}: {e}",
                                     self.engine.backend, self.engine.model_name)
        try:
            await asyncio.to_thread(grade_trajectory, traj)
        except Exception as e:
            traj.correct = False
            traj.error = traj.error or f"grading: {type(e).__name__}: {e}"
        self.episodes_run += 1
        return traj

    async def _guarded(self, row: dict[str, Any]) -> dict[str, Any]:
        assert self._sem is not None
        async with self._sem:
            traj = await self.run_one(row)
        await self._add(traj)
        return stat_row(traj)

    async def __call__(self, batch: Any) -> dict[str, list]:
        self._ensure_loop_objects()
        rows = batch.to_pylist() if hasattr(batch, "to_pylist") else _rows_of(batch)
        done = await asyncio.to_thread(self.store.keys)
        todo = [r for r in rows if (r["id"], int(r["sample"])) not in done]
        skipped = [r for r in rows if (r["id"], int(r["sample"])) in done]
        stats = await asyncio.gather(*(self._guarded(r) for r in todo))
        await self._flush()  # the batch is done only once all of its rows are on disk
        out = list(stats) + [dict.fromkeys(STAT_COLUMNS, None) | {"id": r["id"], "sample": int(r["sample"]),
                             "source": r.get("source") or "", "skipped": True} for r in skipped]
        return {c: [s[c] for s in out] for c in STAT_COLUMNS}


def _rows_of(batch: dict[str, Any]) -> list[dict[str, Any]]:
    cols = list(batch)
    n = len(batch[cols[0]]) if cols else 0
    return [{c: _py(batch[c][i]) for c in cols} for i in range(n)]


def _py(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return x
