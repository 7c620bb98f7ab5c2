"""Any OpenAI-compatible server (an API teacher, an external vLLM server) behind the Engine interface.

Chat requests go to /v1/chat/completions (n, stop, seed, logprobs); raw token-id prompts to /v1/completions.
vLLM server extensions are sent in `extra_body`: `continue_final_message` + `add_generation_prompt=False`
for the first-thought prefix, `ignore_eos` for fixed-length benchmarks. Transient failures (connection,
timeout, 429, 5xx) are retried with exponential backoff; at most `cfg.max_concurrency` requests are in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any

from raydistill.config.engine import EngineConfig
from raydistill.engines.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineError,
    PromptTooLongError,
    SamplingParams,
    register_engine,
)

log = logging.getLogger(__name__)

_CONTEXT_HINTS = ("maximum context length", "context length", "context_length_exceeded", "too long")


@register_engine("openai")
class OpenAIEngine(Engine):
    """`cfg.base_url` (e.g. http://127.0.0.1:8000/v1), `cfg.model` = the served model name, key from
    the environment variable named by `cfg.api_key_env`. `cfg.tokenizer` (optional) is loaded locally to
    report token ids when the server does not return logprobs.
    """

    def __init__(self, cfg: EngineConfig, backoff_s: float = 0.5) -> None:
        super().__init__(cfg)
        if not cfg.base_url:
            raise EngineError("openai engine needs `base_url` (e.g. http://127.0.0.1:8000/v1)")
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise EngineError(f"openai engine: environment variable {cfg.api_key_env!r} is not set")
            self._api_key = key
        else:
            self._api_key = "EMPTY"
        if cfg.tokenizer:
            from transformers import AutoTokenizer

            from raydistill.models import resolve_model

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.tokenizer))
        self.backoff_s = backoff_s
        self._per_loop: dict[asyncio.AbstractEventLoop, tuple[Any, asyncio.Semaphore]] = {}
        self.counters = {"requests": 0, "retries": 0, "failures": 0, "prompt_tokens": 0, "generated_tokens": 0}

    def _client(self) -> tuple[Any, asyncio.Semaphore]:
        from openai import AsyncOpenAI

        loop = asyncio.get_running_loop()
        for old in [lp for lp in self._per_loop if lp.is_closed()]:
            del self._per_loop[old]
        if loop not in self._per_loop:
            client = AsyncOpenAI(base_url=self.cfg.base_url, api_key=self._api_key,
                                 timeout=self.cfg.request_timeout_s, max_retries=0)
            self._per_loop[loop] = (client, asyncio.Semaphore(self.cfg.max_concurrency))
        return self._per_loop[loop]

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        for lp, (client, _) in list(self._per_loop.items()):
            if lp is loop:
                await client.close()
        self._per_loop.clear()

    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        import openai

        client, sem = self._client()
        retriable = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                     openai.InternalServerError)
        self.counters["requests"] += 1
        async with sem:
            for attempt in range(self.cfg.max_retries + 1):
                try:
                    return await self._call(client, request, params)
                except retriable as e:
                    if attempt >= self.cfg.max_retries:
                        self.counters["failures"] += 1
                        raise EngineError(f"openai request failed after {attempt + 1} tries: "
                                          f"{type(e).__name__}: {e}") from e
                    self.counters["retries"] += 1
                    delay = self.backoff_s * (2**attempt) * (1 + random.random() * 0.25)
                    log.info("openai request failed (%s), retry %d in %.2fs", type(e).__name__, attempt + 1, delay)
                    await asyncio.sleep(delay)
                except openai.BadRequestError as e:
                    self.counters["failures"] += 1
                    msg = _error_text(e)
                    if any(h in msg.lower() for h in _CONTEXT_HINTS):
                        raise PromptTooLongError(msg) from e
                    raise EngineError(f"openai bad request: {msg}") from e
                except openai.APIStatusError as e:
                    self.counters["failures"] += 1
                    raise EngineError(f"openai error {e.status_code}: {_error_text(e)}") from e
        raise AssertionError("unreachable")

    async def _call(self, client: Any, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        extra: dict[str, Any] = {}
        if params.ignore_eos:
            extra["ignore_eos"] = True
        # only set what is set: the client sends explicit Nones as JSON nulls, which strict servers refuse
        common: dict[str, Any] = dict(model=self.model_name, n=params.n, temperature=params.temperature,
                                      top_p=params.top_p, max_tokens=params.max_tokens)
        if params.stop:
            common["stop"] = list(params.stop)
        if params.seed is not None:
            common["seed"] = params.seed
        if extra:
            common["extra_body"] = extra
        if request.messages is not None:
            if request.continue_final_message:
                common["extra_body"] = {**extra, "continue_final_message": True, "add_generation_prompt": False}
            if params.logprobs:
                common["logprobs"] = True
            resp = await client.chat.completions.create(messages=request.messages, **common)
        else:
            if params.logprobs:
                common["logprobs"] = 1
            resp = await client.completions.create(prompt=request.prompt_token_ids, **common)
        usage = getattr(resp, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        total_completion = int(getattr(usage, "completion_tokens", 0) or 0)
        choices = sorted(resp.choices, key=lambda c: c.index)
        if len(choices) != params.n:
            raise EngineError(f"server returned {len(choices)} choices for n={params.n}")
        out = []
        for ch in choices:
            if request.messages is not None:
                text = ch.message.content or ""
                lp_items = [t.logprob for t in (ch.logprobs.content or [])] if ch.logprobs else None
            else:
                text = ch.text or ""
                lp_items = list(ch.logprobs.token_logprobs or []) if ch.logprobs else None
            token_ids = list(self.tokenizer.encode(text, add_special_tokens=False)) if self.tokenizer else []
            if lp_items is not None:
                n_tok = len(lp_items)
            elif token_ids:
                n_tok = len(token_ids)
            else:
                n_tok = total_completion // max(1, params.n)
            finish = ch.finish_reason if ch.finish_reason in ("stop", "length", "abort") else "stop"
            extra_fields = getattr(ch, "model_extra", None) or {}
            stop_reason = extra_fields.get("stop_reason", getattr(ch, "stop_reason", None))
            cum = float(sum(x for x in lp_items if x is not None)) if lp_items is not None else None
            out.append(Completion(text=text, token_ids=token_ids, prompt_tokens=prompt_tokens, completion_tokens=n_tok,
                                  finish_reason=finish, stop_reason=stop_reason, cumulative_logprob=cum))
        self.counters["prompt_tokens"] += prompt_tokens
        self.counters["generated_tokens"] += sum(c.completion_tokens for c in out)
        return out


def _error_text(e: Any) -> str:
    """The server's own message (OpenAI `{"error": {"message"}}` or FastAPI `{"detail"}`), not just the code."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            msg = inner.get("message") or inner.get("detail")
            if msg:
                return str(msg)
        if body.get("detail"):
            return str(body["detail"])
    try:
        return e.response.text or str(e)
    except Exception:
        return str(e)
