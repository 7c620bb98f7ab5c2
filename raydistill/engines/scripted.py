"""An engine that returns given texts: tests and demos that need exact model output (parsing, voting).

Stop strings are applied as a real backend would (text cut before the earliest stop, `stop_reason` set),
so the episode's `<end_code>` normalisation is exercised the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from raydistill.config.engine import EngineConfig
from raydistill.engines.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineError,
    SamplingParams,
    register_engine,
)
from raydistill.engines.rendering import truncate_at_stop

Reply = str | Completion
Script = Sequence[Reply | Sequence[Reply]] | Callable[[ChatRequest, SamplingParams, int], Any]


@register_engine("scripted")
class ScriptedEngine(Engine):
    """`outputs`: a list consumed one item per `generate` call (an item is a text, a Completion, or a list of
    them - one per sample when n > 1; a single item is repeated n times), or a callable
    `(request, params, call_index) -> item` (may be async). Default: `cfg.script`, cycling.
    Every call is kept in `self.calls` as (request, params) for tests to inspect.
    """

    def __init__(self, cfg: EngineConfig | None = None, outputs: Script | None = None, *, cycle: bool | None = None,
                 delay_s: float = 0.0) -> None:
        cfg = cfg or EngineConfig(backend="scripted", model="scripted")
        super().__init__(cfg)
        if outputs is None:
            outputs = list(cfg.script)
            cycle = True if cycle is None else cycle
        self.outputs = outputs
        self.cycle = bool(cycle)
        self.delay_s = delay_s
        self.calls: list[tuple[ChatRequest, SamplingParams]] = []
        self._next = 0

    def _take(self, request: ChatRequest, params: SamplingParams) -> Any:
        i = len(self.calls) - 1
        if callable(self.outputs):
            return self.outputs(request, params, i)
        if not self.outputs:
            raise EngineError("scripted engine has no outputs")
        if self._next >= len(self.outputs):
            if not self.cycle:
                raise EngineError(f"scripted engine ran out of outputs after {len(self.outputs)} calls")
            self._next = 0
        item = self.outputs[self._next]
        self._next += 1
        return item

    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        self.calls.append((request, params))
        item = self._take(request, params)
        if asyncio.iscoroutine(item):
            item = await item
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        items = list(item) if isinstance(item, list | tuple) else [item] * params.n
        if len(items) != params.n:
            raise EngineError(f"scripted item has {len(items)} samples, request asked for n={params.n}")
        prompt_tokens = _count_prompt(request)
        return [self._complete(x, params, prompt_tokens) for x in items]

    @staticmethod
    def _complete(x: Reply, params: SamplingParams, prompt_tokens: int) -> Completion:
        if isinstance(x, Completion):
            c = Completion(**{**x.__dict__})
        else:
            c = Completion(text=str(x), cumulative_logprob=0.0 if params.logprobs else None)
        text, stop = truncate_at_stop(c.text, params.stop)
        words = text.split()
        if len(words) > params.max_tokens:  # whitespace words stand in for tokens
            text = " ".join(words[: params.max_tokens])
            c.finish_reason, stop = "length", None
        c.text, c.stop_reason = text, stop
        c.completion_tokens = c.completion_tokens or len(text.split())
        c.prompt_tokens = c.prompt_tokens or prompt_tokens
        return c


def _count_prompt(request: ChatRequest) -> int:
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return sum(len(m["content"].split()) for m in request.messages or [])
