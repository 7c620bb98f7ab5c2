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
from array import array
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raydistill.agent.trajectory import Trajectory
from raydistill.config import RootConfig
from raydistill.curation.filter import grade_trajectory, rejection_reasons
from raydistill.curation.store import TrajectoryStore
from raydistill.engines.base import ChatRequest, Completion, Engine, SamplingParams
from raydistill.engines.rendering import render_prompt_text

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
    """One progress row. An ungraded trajectory (grading left to the filter step) has correct=None."""
    reasons = [] if skipped or t.correct is None else rejection_reasons(t)
    return {
        "id": t.id, "sample": t.sample, "source": t.source, "correct": None if t.correct is None else bool(t.correct),
        "reason": reasons[0] if reasons else "", "steps": t.num_steps,
        "prompt_tokens": sum(s.prompt_tokens for s in t.steps),
        "completion_tokens": sum(s.completion_tokens for s in t.steps),
        "gen_s": sum(s.gen_s for s in t.steps), "exec_s": sum(s.exec_s for s in t.steps),
        "code_steps": sum(1 for s in t.steps if s.code), "duration_s": t.duration_s, "skipped": skipped,
    }


class _Conversation:
    """What one conversation's last request sent: rendered text, its token ids, and the generated ids (with the
    text each was shown to the caller as, when that is not their decoding: see `alias_texts`)."""

    __slots__ = ("alias", "gen", "ids", "text")

    def __init__(self, text: str, ids: list[int], gen: list[list[int]]) -> None:
        self.text, self.ids, self.gen = text, array("i", ids), [array("i", g) for g in gen]
        self.alias: list[str] | None = None


class IncrementalPromptEngine(Engine):
    """Wraps a backend that tokenizes locally (vLLM, transformers) so each agent step tokenizes only its
    new turn, and the prompt keeps the exact token prefix of the previous step.

    Why: re-encoding the whole conversation every step costs ~2 us per token of CPU on the process that also
    runs vLLM's AsyncLLM output handler (one event loop): ~5 ms per step at 2,800 tokens, 5,000+ steps per
    benchmark run, all of it stalling the engine's output processing. And a prompt whose prefix is exactly
    the previous prompt + the generated ids hits vLLM's prefix cache for the generated blocks too (as the
    bare driver's `ids + out + obs` does), which a re-tokenized transcript need not.

    How: the chat template is still rendered in full (cheap); if that text starts with the text this
    conversation sent last time, its ids are reused and only the remainder is encoded. When the remainder
    starts with the decoded text of a completion we returned for that request, the generated ids themselves
    are spliced in (what the model really saw). The remainder is encoded separately only where the cut is a
    safe token boundary (it does not start with whitespace); anything else falls back to a full encode, so
    a conversation edited in the middle (the fallback request) is still rendered correctly. The conversation
    key is only a hint (id of the first message); correctness rests on the text-prefix check.
    """

    def __init__(self, inner: Engine, max_conversations: int = 4096) -> None:
        self.cfg = inner.cfg
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.model_name = inner.model_name
        self.backend = inner.backend  # trajectories record the real backend
        self.max_conversations = max_conversations
        self._convs: OrderedDict[int, _Conversation] = OrderedDict()
        self._systems: dict[str, tuple[str, array]] = {}
        self._safe: bool | None = None
        self.counters = {"requests": 0, "full": 0, "incremental": 0, "generated_spliced": 0, "system_reused": 0,
                         "tokens_encoded": 0, "tokens_reused": 0, "render_s": 0.0}

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, ids: array) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def prompt_ids(self, request: ChatRequest) -> tuple[int | None, str, list[int]]:
        """(conversation key, rendered text, token ids) of `request` (messages only)."""
        assert request.messages is not None
        text = render_prompt_text(self.tokenizer, request)
        key = id(request.messages[0]) if request.messages else None
        conv = self._convs.get(key) if key is not None else None
        if conv is not None and len(text) > len(conv.text) and text.startswith(conv.text):
            rest = text[len(conv.text):]
            base = conv.ids.tolist()
            spliced = False
            for j, gen in enumerate(conv.gen):
                gen_text = (conv.alias[j] if conv.alias else self._decode(gen)) if len(gen) else ""
                if gen_text and rest.startswith(gen_text):
                    base.extend(gen.tolist())
                    rest = rest[len(gen_text):]
                    spliced = True
                    break
            if spliced or not rest[:1].isspace():
                new = self._encode(rest) if rest else []
                self.counters["incremental"] += 1
                self.counters["generated_spliced"] += spliced
                self.counters["tokens_encoded"] += len(new)
                self.counters["tokens_reused"] += len(base)
                return key, text, base + new
        ids = self._first_prompt_ids(request.messages, text)
        self.counters["full"] += 1
        return key, text, ids

    def _first_prompt_ids(self, messages: list[dict[str, str]], text: str) -> list[int]:
        """A prompt with no earlier turn to extend: reuse the encoded system turn (the same long teacher
        prompt for every episode) when the text starts with it at a safe cut, else encode it all."""
        if messages[0].get("role") == "system" and len(messages) > 1:
            content = messages[0]["content"]
            sys = self._systems.get(content)
            if sys is None:
                sys_text = self.tokenizer.apply_chat_template(messages[:1], tokenize=False,
                                                              add_generation_prompt=False)
                sys = (sys_text, array("i", self._encode(sys_text)))
                self._systems[content] = sys
                while len(self._systems) > 64:
                    self._systems.pop(next(iter(self._systems)))
            sys_text, sys_ids = sys
            rest = text[len(sys_text):]
            if text.startswith(sys_text) and rest and not rest[:1].isspace():
                new = self._encode(rest)
                self.counters["system_reused"] += 1
                self.counters["tokens_encoded"] += len(new)
                self.counters["tokens_reused"] += len(sys_ids)
                return sys_ids.tolist() + new
        ids = self._encode(text)
        self.counters["tokens_encoded"] += len(ids)
        return ids

    def splice_safe(self) -> bool:
        """Whether encoding a prompt in pieces gives the ids of encoding it whole, on a sample conversation
        (False for tokenizers that add a prefix space to every piece, e.g. some SentencePiece ones); checked
        once, and when False every prompt is encoded whole."""
        if self._safe is None:
            msgs = [{"role": "system", "content": "You are a careful solver."},
                    {"role": "user", "content": "What is 6 * 7?"}]
            probe = IncrementalPromptEngine(self.inner)  # fresh caches and counters, same tokenizer
            probe._safe = True
            try:
                key, text, ids = probe.prompt_ids(ChatRequest(messages=msgs))
                ok = ids == self._encode(text)
                probe._convs[key] = _Conversation(text, ids, [])
                msgs += [{"role": "assistant", "content": "Thought: multiply.\n```py\nprint(6 * 7)\n```<end_code>"},
                         {"role": "user", "content": "Observation:\nExecution logs:\n42\n"}]
                _, text, ids = probe.prompt_ids(ChatRequest(messages=msgs))
                self._safe = ok and ids == self._encode(text) and probe.counters["incremental"] == 1
            except Exception as e:  # a template that cannot render the probe: stay on the whole-prompt path
                log.warning("incremental prompts off: probe failed: %s: %s", type(e).__name__, e)
                self._safe = False
            if not self._safe:
                log.warning("incremental prompts off: this tokenizer encodes pieces differently from the whole")
        return self._safe

    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        if request.messages is None or self.tokenizer is None or not self.splice_safe():
            return await self.inner.generate(request, params)
        t0 = time.perf_counter()
        key, text, ids = self.prompt_ids(request)
        self.counters["requests"] += 1
        self.counters["render_s"] += time.perf_counter() - t0
        comps = await self.inner.generate(ChatRequest(prompt_token_ids=ids), params)
        if key is not None:
            self._convs[key] = _Conversation(text, ids, [c.token_ids for c in comps])
            self._convs.move_to_end(key)
            while len(self._convs) > self.max_conversations:
                self._convs.popitem(last=False)
        return comps

    def alias_texts(self, request: ChatRequest, texts: list[str]) -> None:
        """The completions just returned for `request` reach the episode as `texts`, not as their decoding.

        For fixed-action benchmark mode (engines/fixed_action.py), which swaps the random tokens' text for a
        valid action: a later prompt carrying one of these texts gets that completion's generated ids spliced
        in, so the engine sees its own tokens again, as in a real run (where the text is their decoding),
        instead of re-prefilling a re-encoded action the model never generated."""
        conv = self._convs.get(id(request.messages[0])) if request.messages else None
        if conv is not None and len(texts) == len(conv.gen):
            conv.alias = list(texts)

    async def generate_batch(self, requests: Any, params: SamplingParams) -> list[list[Completion]]:
        return list(await asyncio.gather(*(self.generate(r, params) for r in requests)))

    async def reset_prefix_cache(self) -> None:
        await self.inner.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        return {**self.inner.stats(), "prompt_cache": dict(self.counters)}

    async def aclose(self) -> None:
        self._convs.clear()
        await self.inner.aclose()


def incremental_prompts_apply(engine: Engine) -> bool:
    """Backends that render prompts to ids here (the OpenAI backend's server renders its own)."""
    return engine.backend in ("vllm", "transformers") and engine.tokenizer is not None


class TeacherWorker:
    """`ds.map_batches(TeacherWorker, fn_constructor_kwargs=dict(cfg=cfg, kind=..., out_dir=...))`.

    cfg: the RootConfig (or its dict). kind: "agent" or "cot". out_dir: the trajectory shard directory.
    sandbox_pool: a `raydistill.actors.sandbox_pool.SandboxPool` (agent kind): each episode gets a sticky
        sandbox handle from it. None runs sandboxes inside this actor instead.
    web_search: the picklable tool (`raydistill.actors.retriever.make_web_search_tool(handle)`), run by the
        sandbox host on behalf of the code; None when retrieval is off.
    incremental_prompts: wrap the engine in `IncrementalPromptEngine` where it applies (off only to measure
        the old full re-render path).
    grade_in_worker: grade each trajectory here (fills `correct` in the stat rows and progress line). Off:
        trajectories are written ungraded and the filter step grades them (it always re-grades anyway).
    """

    def __init__(self, cfg: RootConfig | dict[str, Any], kind: str, out_dir: str, sandbox_pool: Any = None,
                 web_search: Callable | None = None, run_token: str | None = None,
                 incremental_prompts: bool = True, grade_in_worker: bool = True) -> None:
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
        self.incremental_prompts = incremental_prompts
        self.grade_in_worker = grade_in_worker
        # Wall-clock seconds per phase, summed over episodes (cheap; read by benchmarks via `phase_stats`).
        self.phases: dict[str, float] = dict.fromkeys(("sandbox_create", "episode", "grade", "write", "stat"), 0.0)
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
        engine = create_engine(t)
        if self.incremental_prompts and incremental_prompts_apply(engine):
            engine = IncrementalPromptEngine(engine, max_conversations=max(4096, 4 * self.cfg.generate.episodes_per_worker))
        return engine

    def phase_stats(self) -> dict[str, Any]:
        """Per-phase wall seconds (summed over concurrent episodes) and the engine's counters."""
        return {"phases": {k: round(v, 3) for k, v in self.phases.items()}, "episodes_run": self.episodes_run,
                "engine": self.engine.stats()}

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
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self._write, items)
                self.phases["write"] += time.perf_counter() - t0
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

    def _sandbox(self) -> Any:
        """A factory the episode calls at its start and awaits at its first code step (creation overlaps the
        first generation); None: run_episode makes a local Sandbox with self.tools."""
        if self.sandbox_pool is None:
            return None

        async def make() -> Any:
            t0 = time.perf_counter()
            try:
                return await self.sandbox_pool.create(tools=self.tools)
            finally:
                self.phases["sandbox_create"] += time.perf_counter() - t0

        return make

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
                t1 = time.perf_counter()
                sandbox = self._sandbox()
                traj = await run_episode(self.engine, sandbox, record, self.cfg.agent, role="teacher",
                                         tools=self.tools if sandbox is None else list(self.tools),
                                         sample=int(row["sample"]), seed=seed, temperature=self._temperature())
                self.phases["episode"] += time.perf_counter() - t1
        except asyncio.CancelledError:
            raise
        except Exception as e:  # anything the episode itself did not turn into a recorded failure
            log.warning("episode %s/%s crashed: %s: %s", row["id"], row["sample"], type(e).__name__, e)
            traj = failed_trajectory(row, self.kind, f"worker: {type(e).__name__}: {e}",
                                     self.engine.backend, self.engine.model_name)
        if self.grade_in_worker:
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(grade_trajectory, traj)
            except Exception as e:
                traj.correct = False
                traj.error = traj.error or f"grading: {type(e).__name__}: {e}"
            self.phases["grade"] += time.perf_counter() - t0
        self.episodes_run += 1
        return traj

    async def _guarded(self, row: dict[str, Any]) -> dict[str, Any]:
        assert self._sem is not None
        async with self._sem:
            traj = await self.run_one(row)
        await self._add(traj)
        t0 = time.perf_counter()
        row = stat_row(traj)
        self.phases["stat"] += time.perf_counter() - t0
        return row

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
