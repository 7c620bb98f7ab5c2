"""Fixed-action mode for benchmarks: real generation cost, parseable actions.

Random-weight models never write runnable code, so an episode on them would measure only parse errors. This
wrapper lets the inner engine generate exactly `gen_tokens` tokens per sample (ignore EOS, no stop strings -
the GPU cost is real) and then hands the episode a fixed, valid code action instead of the random text,
padded with filler words to about the same token count so the transcript (and the next prompt) grows as it
would have. Behind an `IncrementalPromptEngine` the next prompt still carries the generated ids, not a
re-encoding of the substituted text (see its `alias_texts`), so the engine sees what a real run sends it.
The episode then really parses, executes in the sandbox, forks and votes. Used by
benchmarks/episodes.py and by the generation/serving GPU benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from raydistill.engines.base import ChatRequest, Completion, Engine, SamplingParams

ActionFn = Callable[[int, int], str]
"""(step index, sample index) -> python code for that step."""


def default_action(max_steps: int, tool: str | None = "web_search") -> ActionFn:
    """Steps 0..max_steps-2 call the tool (or compute), print its result and keep state in a variable;
    the last step calls final_answer with a value computed from every earlier step (checks persistence)."""

    def action(step: int, sample: int) -> str:
        if step >= max_steps - 1:
            return "final_answer(str(sum(v for k, v in sorted(globals().items()) if k.startswith('acc_'))))"
        call = f"{tool}('query {step}')" if tool else f"'x' * {40 + step}"
        return f"acc_{step} = {step + 1}\nresult = {call}\nprint(result)"

    return action


class FixedActionEngine(Engine):
    """Wraps `inner`; every completion's text becomes `Thought: <filler>` + a code block with `action(step, i)`.

    gen_tokens: tokens the inner engine must generate per sample (None keeps the caller's max_tokens).
    The step index is the number of assistant turns already in the request (a continued turn counts as the
    current step).
    """

    backend = "fixed_action"

    def __init__(self, inner: Engine, action: ActionFn, gen_tokens: int | None = None,
                 tokenizer: Any = None) -> None:
        self.cfg = inner.cfg
        self.inner = inner
        self.action = action
        self.gen_tokens = gen_tokens
        self.model_name = inner.model_name
        self.tokenizer = tokenizer if tokenizer is not None else inner.tokenizer
        self.backend = f"fixed_action+{inner.backend}"
        self._filler_cache: dict[int, int] = {}

    def _count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _text(self, code: str, target_tokens: int) -> str:
        """The action text, padded with filler words to ~target_tokens tokens."""
        bare = f"Thought: step.\n```py\n{code}\n```"
        n = self._count(bare)
        if target_tokens <= n:
            return bare
        per = self._filler_cache.get(0)
        if per is None:
            per = max(1, self._count(" step" * 100) // 100)
            self._filler_cache[0] = per
        words = (target_tokens - n) // per
        text = f"Thought: step{' step' * words}.\n```py\n{code}\n```"
        while self._count(text) > target_tokens and words > 0:  # tokenizers merge unevenly; trim to fit
            words -= 1
            text = f"Thought: step{' step' * words}.\n```py\n{code}\n```"
        return text

    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        gen = self.gen_tokens or params.max_tokens
        inner_params = params.replace(max_tokens=gen, ignore_eos=True, stop=())
        comps = await self.inner.generate(request, inner_params)
        msgs = request.messages or []
        step = sum(1 for m in msgs if m["role"] == "assistant")
        if request.continue_final_message:
            step -= 1
        if msgs and msgs[0]["role"] == "system" and "<answer>" in msgs[-1]["content"] and step == 0:
            return comps  # a CoT request (ftp): keep the generated text
        out = []
        for i, c in enumerate(comps):
            text = self._text(self.action(step, i), c.completion_tokens)
            out.append(replace(c, text=text, finish_reason="stop", stop_reason="<end_code>"))
        alias = getattr(self.inner, "alias_texts", None)  # IncrementalPromptEngine: keep the generated ids
        if alias is not None:
            alias(request, [c.text for c in out])
        return out

    async def reset_prefix_cache(self) -> None:
        await self.inner.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    async def aclose(self) -> None:
        await self.inner.aclose()
