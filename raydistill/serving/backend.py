"""`EpisodeBackend`: runs student episodes and chat completions for the HTTP app.

The same class serves both ways: with an in-process engine and local sandboxes (tests, one machine), or, in
the Ray Serve app, with an engine proxy whose `generate` calls the engine deployment and a sandbox factory
that leases sandboxes from the pool deployment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from raydistill.agent import run_episode
from raydistill.agent.trajectory import Trajectory
from raydistill.config.agent import AgentConfig
from raydistill.data.records import Record
from raydistill.engines.base import ChatRequest, Completion, Engine, SamplingParams
from raydistill.serving.app import StepCallback


class EpisodeBackend:
    """engine: any Engine (shared by all requests). sandbox_factory: zero-arg (a)sync callable returning a fresh
    sandbox that already holds the tools, or None for a local `Sandbox(tools=tools)` per episode.
    tools: tool callables (local sandboxes) or names (pool sandboxes that hold them)."""

    def __init__(self, engine: Engine, *, sandbox_factory: Callable[[], Any] | None = None,
                 tools: Mapping[str, Callable] | list[str] | None = None, model_name: str | None = None,
                 health_extra: Callable[[], Any] | None = None) -> None:
        self.engine = engine
        self.sandbox_factory = sandbox_factory
        self.tools = tools
        self.model_name = model_name or engine.model_name
        self._health_extra = health_extra

    async def solve(self, question: Record, agent_cfg: AgentConfig, on_step: StepCallback | None) -> Trajectory:
        return await run_episode(self.engine, self.sandbox_factory, question, agent_cfg, role="student",
                                 tools=self.tools, on_step=on_step)

    async def chat(self, messages: list[dict], params: dict, continue_final_message: bool) -> list[Completion]:
        request = ChatRequest(messages=messages, continue_final_message=continue_final_message)
        return await self.engine.generate(request, SamplingParams(**params))

    async def health(self) -> dict:
        extra = {}
        if self._health_extra is not None:
            extra = self._health_extra()
            if hasattr(extra, "__await__"):
                extra = await extra
        return {"engine": self.engine.describe(), "tools": list(self.tools or []), **(extra or {})}
