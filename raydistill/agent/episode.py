"""The agent episode: prompt -> engine -> parse -> execute -> observation, up to `max_steps`.

One `Episode` owns its transcript and its sandbox (and closes it). Thousands run concurrently on one event
loop against one engine; nothing here blocks the loop. Model misbehaviour (unparseable text, failing code,
no answer) is recorded in the trajectory, never raised; engine or sandbox failures end the episode with
`Trajectory.error` set. Cancelling the task (e.g. a client disconnect) closes the sandbox and re-raises.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from raydistill.agent import parsing
from raydistill.agent.cot import cot_messages
from raydistill.agent.messages import episode_prefix
from raydistill.agent.parsing import Action
from raydistill.agent.prompts import MAX_STEPS_PROMPT, Role
from raydistill.agent.sag import Candidate, execute_candidates, vote
from raydistill.agent.trajectory import Step, Trajectory
from raydistill.config.agent import AgentConfig
from raydistill.engines.base import ChatRequest, Completion, Engine, PromptTooLongError, SamplingParams

log = logging.getLogger(__name__)


class SandboxLike(Protocol):
    """What an episode needs from a sandbox (raydistill.sandbox.Sandbox or a Ray pool handle)."""

    async def arun(self, code: str) -> Any: ...
    async def afork(self) -> SandboxLike: ...


SandboxFactory = Callable[[], "SandboxLike | Awaitable[SandboxLike]"]
StepCallback = Callable[[int, Step], "Any | Awaitable[Any]"]


def _question_fields(record: Any, sample: int) -> dict[str, Any]:
    """Accept a data Record, a dict with the same keys, or a bare question string."""
    if isinstance(record, str):
        return dict(id="q", sample=sample, source="", domain="math", question=record, gold=[])
    get = record.get if isinstance(record, Mapping) else (lambda k, d=None: getattr(record, k, d))
    question = get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"episode record has no question: {record!r}")
    gold = get("answer", get("gold", []))
    gold = [] if gold is None else [str(g) for g in gold] if isinstance(gold, list | tuple) else [str(gold)]
    domain = get("domain", "math") or "math"
    return dict(id=str(get("id", "q")), sample=sample, source=str(get("source", "") or ""),
                domain=domain if domain in ("math", "qa") else "math", question=question, gold=gold)


async def _maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


async def close_sandbox(sb: Any) -> None:
    """Close a sandbox or pool handle, whichever close method it has; never raises."""
    if sb is None:
        return
    try:
        if hasattr(sb, "aclose"):
            await sb.aclose()
        elif hasattr(sb, "close"):
            await asyncio.to_thread(sb.close)
    except Exception as e:  # closing is best effort; the sandbox layer reaps what we cannot
        log.debug("sandbox close failed: %s", e)


_closing: set[asyncio.Task] = set()


def _close_when_made(task: asyncio.Future) -> None:
    """Done-callback for a sandbox creation its episode no longer waits for: close the sandbox it made."""
    if task.cancelled() or task.exception() is not None:
        return
    t = asyncio.ensure_future(close_sandbox(task.result()))
    _closing.add(t)  # keep a reference until it finishes
    t.add_done_callback(_closing.discard)


def default_sandbox_factory(tools: Mapping[str, Callable] | None) -> SandboxFactory:
    def make() -> Any:
        from raydistill.sandbox import Sandbox

        return Sandbox(tools=dict(tools or {}))

    return make


class Episode:
    """State machine for one trajectory. Use `await Episode(...).run()` or `run_episode(...)`."""

    def __init__(
        self,
        engine: Engine,
        sandbox: SandboxLike | SandboxFactory | None,
        record: Any,
        cfg: AgentConfig,
        *,
        role: Role = "teacher",
        tools: Mapping[str, Callable] | list[str] | None = None,
        sample: int = 0,
        seed: int | None = None,
        sag: bool | None = None,
        ftp: bool | None = None,
        temperature: float | None = None,
        on_step: StepCallback | None = None,
    ) -> None:
        if role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
        self.engine = engine
        self.cfg = cfg
        self.role: Role = role
        tool_names = list(tools.keys()) if isinstance(tools, Mapping) else list(tools or [])
        self.tool_names = [t for t in tool_names if t != "final_answer"]
        if sandbox is None:
            if tools is not None and not isinstance(tools, Mapping):
                raise ValueError("pass tool callables (a mapping) when the episode creates its own sandbox")
            sandbox = default_sandbox_factory(tools)  # type: ignore[arg-type]
        self._sandbox_src = sandbox
        self.sb: Any = None
        self._sb_task: asyncio.Future | None = None
        self.sag = cfg.sag.enabled if sag is None else sag
        self.ftp = (cfg.ftp and role == "teacher") if ftp is None else ftp
        self.seed = seed
        self.on_step = on_step
        temp = cfg.temperature if temperature is None else temperature
        self.params = SamplingParams(n=1, temperature=temp, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                     stop=tuple(cfg.stop), seed=seed)
        self.sag_params = SamplingParams(n=cfg.sag.n, temperature=cfg.sag.temperature, top_p=cfg.sag.top_p,
                                         max_tokens=cfg.max_new_tokens, stop=tuple(cfg.stop), seed=seed,
                                         logprobs=True)
        sampling = {"step": self.params.to_dict(), "sag": self.sag_params.to_dict() if self.sag else None,
                    "ftp": self.ftp}
        self.traj = Trajectory(**_question_fields(record, sample), kind="agent", engine=engine.backend,
                               model=engine.model_name, sampling=json.dumps(sampling), system_prompt=role,
                               tools=self.tool_names)
        self.messages: list[dict[str, str]] = episode_prefix(self.traj.question, role, self.tool_names)

    # -- helpers -------------------------------------------------------------------------------------
    def _step_params(self, step: int, sag: bool) -> SamplingParams:
        p = self.sag_params if sag else self.params
        return p if self.seed is None else p.replace(seed=self.seed + step)

    async def _generate(self, messages: list[dict[str, str]], params: SamplingParams,
                        cont: bool = False) -> tuple[list[Completion], float]:
        t0 = time.perf_counter()
        comps = await self.engine.generate(ChatRequest(messages=messages, continue_final_message=cont), params)
        return comps, time.perf_counter() - t0

    def _start_sandbox(self) -> None:
        """Start making the sandbox without waiting: a pool sandbox takes a Ray call and a process fork
        (~0.2 s under load), which now overlaps the first generation instead of preceding it."""
        src = self._sandbox_src
        if callable(src) and not hasattr(src, "arun"):
            self._sb_task = asyncio.ensure_future(_maybe_await(src()))
        else:
            self.sb = src

    async def _box(self) -> Any:
        """The sandbox, waiting for it on first use (a failure to make it raises here, in the step)."""
        if self.sb is None and self._sb_task is not None:
            self.sb = await asyncio.shield(self._sb_task)  # cancelled here: _close_sandbox closes what it makes
            self._sb_task = None
        return self.sb

    async def _close_sandbox(self) -> None:
        sb, task, self.sb, self._sb_task = self.sb, self._sb_task, None, None
        if task is not None:  # never used: let the creation finish, then close what it made
            if task.done():
                sb = None if task.cancelled() or task.exception() is not None else task.result()
            else:
                task.add_done_callback(_close_when_made)
        await close_sandbox(sb)

    def _max_chars(self) -> int:
        return self.cfg.observation_max_chars

    def _observation(self, result: Any) -> str:
        if result.error:
            return parsing.format_error(str(result.error), self._max_chars(), result.stdout or "")
        return parsing.format_observation(result.stdout or "", result.value, self._max_chars())

    async def _emit(self, step: Step) -> None:
        if self.on_step is not None:
            await _maybe_await(self.on_step(len(self.traj.steps) - 1, step))

    # -- the loop ------------------------------------------------------------------------------------
    async def run(self) -> Trajectory:
        t_start = time.perf_counter()
        try:
            self._start_sandbox()
            prefix = await self._first_thought() if self.ftp else ""
            for step_idx in range(self.cfg.max_steps):
                step = await (self._sag_step(step_idx, prefix) if self.sag and self.cfg.sag.n > 1
                              else self._plain_step(step_idx, prefix))
                prefix = ""
                if step is None:  # engine/sandbox failure: traj.error is set
                    break
                self.traj.steps.append(step)
                await self._emit(step)
                if step.is_final:
                    break
                self.messages.append({"role": "assistant", "content": step.raw_text})
                self.messages.append({"role": "user", "content": step.observation})
            else:
                self.traj.max_steps_reached = True
                await self._fallback()
        except PromptTooLongError as e:
            self.traj.error = f"context window exceeded: {e}"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("episode %s failed: %s: %s", self.traj.id, type(e).__name__, e)
            self.traj.error = f"{type(e).__name__}: {e}"
        finally:
            await self._close_sandbox()
            self.traj.duration_s = round(time.perf_counter() - t_start, 4)
        return self.traj

    async def _first_thought(self) -> str:
        """ftp: a plain CoT answer; its first paragraph seeds the first agent step."""
        params = self.params.replace(stop=(), max_tokens=self.cfg.ftp_max_new_tokens)
        comps, _ = await self._generate(cot_messages(self.traj.question), params)
        cot = comps[0].text
        para = parsing.first_paragraph(cot)
        self.traj.ftp_cot = cot
        if not para:
            return ""
        self.traj.ftp_prefix = f"Thought: {para}\n\n"
        return self.traj.ftp_prefix

    def _request_messages(self, prefix: str) -> tuple[list[dict[str, str]], bool]:
        if prefix:
            return [*self.messages, {"role": "assistant", "content": prefix}], True
        return self.messages, False

    async def _plain_step(self, step_idx: int, prefix: str) -> Step | None:
        msgs, cont = self._request_messages(prefix)
        comps, gen_s = await self._generate(msgs, self._step_params(step_idx, sag=False), cont)
        c = comps[0]
        raw = parsing.normalize_end_code(prefix + c.text, c.stop_reason)
        action = parsing.parse_action(raw)
        step = Step(raw_text=raw, thought=action.thought, code=action.code, prompt_tokens=c.prompt_tokens,
                    completion_tokens=c.completion_tokens, gen_s=round(gen_s, 4))
        if not action.ok:
            step.parse_error = True
            step.observation = parsing.format_error(action.parse_error or "parse error", self._max_chars())
            return step
        t0 = time.perf_counter()
        try:
            result = await (await self._box()).arun(action.code)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            step.exec_error = True
            step.exec_s = round(time.perf_counter() - t0, 4)
            step.observation = parsing.format_error(f"sandbox failure: {type(e).__name__}: {e}", self._max_chars())
            self.traj.steps.append(step)
            await self._emit(step)
            self.traj.error = f"sandbox failure: {type(e).__name__}: {e}"
            return None
        step.exec_s = round(time.perf_counter() - t0, 4)
        self._apply_result(step, result)
        return step

    def _apply_result(self, step: Step, result: Any) -> None:
        step.exec_error = bool(result.error)
        step.observation = self._observation(result)
        if result.is_final and not result.error:
            step.is_final = True
            self.traj.final_answer = None if result.final_answer is None else str(result.final_answer)

    async def _sag_step(self, step_idx: int, prefix: str) -> Step | None:
        msgs, cont = self._request_messages(prefix)
        comps, gen_s = await self._generate(msgs, self._step_params(step_idx, sag=True), cont)
        cands = []
        for i, c in enumerate(comps):
            raw = parsing.normalize_end_code(prefix + c.text, c.stop_reason)
            cands.append(Candidate(index=i, text=raw, action=parsing.parse_action(raw), logprob=c.cumulative_logprob))
        t0 = time.perf_counter()
        try:
            await execute_candidates(await self._box(), cands)
            v = vote(cands)
        except BaseException:
            await asyncio.gather(*(close_sandbox(c.fork) for c in cands))
            raise
        exec_s = time.perf_counter() - t0
        chosen = cands[v.chosen] if v.chosen is not None else cands[0]
        c = comps[chosen.index]
        step = Step(raw_text=chosen.text, thought=chosen.action.thought, code=chosen.action.code,
                    prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                    gen_s=round(gen_s, 4), exec_s=round(exec_s, 4))
        sag_info = json.loads(v.to_json())
        sag_info["completion_tokens_total"] = sum(x.completion_tokens for x in comps)
        step.sag = json.dumps(sag_info)
        # Commit only the winner's fork; close every other fork.
        winner_fork = chosen.fork if v.chosen is not None else None
        await asyncio.gather(*(close_sandbox(x.fork) for x in cands if x.fork is not None and x.fork is not winner_fork))
        if winner_fork is not None:
            old, self.sb = self.sb, winner_fork
            await close_sandbox(old)
            self._apply_result(step, chosen.result)
            return step
        # None survived: the first sample's failure is the observation; the live state is untouched.
        first = cands[0]
        if not first.action.ok:
            step.parse_error = True
            step.observation = parsing.format_error(first.action.parse_error or "parse error", self._max_chars())
        else:
            step.exec_error = True
            stdout = first.result.stdout if first.result is not None else ""
            step.observation = parsing.format_error(first.exec_error or "execution failed", self._max_chars(),
                                                    stdout or "")
        return step

    async def _fallback(self) -> None:
        """After the step limit: ask once more for the answer, from the transcript (marked as fallback)."""
        last = self.traj.steps[-1] if self.traj.steps else None
        msgs = list(self.messages)
        if last is not None:
            # the loop appended the last step's turn pair already; fold the request into the last user turn
            msgs[-1] = {"role": "user", "content": f"{msgs[-1]['content']}\n\n{MAX_STEPS_PROMPT}"}
        else:
            msgs.append({"role": "user", "content": MAX_STEPS_PROMPT})
        params = self._step_params(self.cfg.max_steps, sag=False).replace(stop=("Observation:",))
        comps, _ = await self._generate(msgs, params)
        text = comps[0].text
        self.traj.fallback_text = text
        answer = None
        action = parsing.parse_action(parsing.normalize_end_code(text))
        if action.ok and "final_answer" in (action.code or ""):
            try:
                r = await (await self._box()).arun(action.code)
                if r.is_final and not r.error and r.final_answer is not None:
                    answer = str(r.final_answer)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("fallback final_answer code failed: %s", e)
        if answer is None:
            answer = parsing.extract_free_answer(text)
        self.traj.final_answer = answer
        self.traj.fallback_answer = answer is not None


async def run_episode(
    engine: Engine, sandbox: SandboxLike | SandboxFactory | None, record: Any, cfg: AgentConfig, **options: Any
) -> Trajectory:
    """Run one agent episode and return its trajectory (never raises for model or tool misbehaviour).

    engine: any `Engine`; many episodes may share it concurrently.
    sandbox: a sandbox (or Ray pool handle) with `arun`/`afork`, a zero-arg factory returning one (sync or
        async), or None for a local `raydistill.sandbox.Sandbox(tools=tools)`. The episode takes ownership and
        closes it (and any sag forks) when done.
    record: a `raydistill.data.Record`, a dict with its keys, or a bare question string.
    tools: tool callables (name -> fn) or, when `sandbox` already holds them, just their names. Only tools
        given here are offered in the prompt; `final_answer` is always there.
    role: "teacher" (long prompt; ftp when cfg.ftp) or "student" (short prompt).
    sag / ftp / temperature: override cfg.sag.enabled / cfg.ftp / cfg.temperature for this episode.
    seed: sampling seed (step k uses seed + k); sample: index stored in the trajectory (k > 1 per question).
    on_step(i, step): called (awaited if async) after each step - streaming in serving.
    `**options` (role, tools, sample, seed, sag, ftp, temperature, on_step) go to `Episode`, keyword only.
    """
    return await Episode(engine, sandbox, record, cfg, **options).run()


__all__ = ["Action", "Episode", "SandboxLike", "close_sandbox", "run_episode"]
