"""A minimal OpenAI-compatible HTTP app over any Engine (chat + completions, n, stop, logprobs, seed).

It makes the openai backend testable against a real local server (wrapping the transformers engine), and
serving can mount it as its `/v1/chat/completions` pass-through. Accepts vLLM's extensions
`continue_final_message`, `add_generation_prompt` and `ignore_eos`, and returns vLLM's `stop_reason`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raydistill.engines.base import ChatRequest, Engine, EngineError, PromptTooLongError, SamplingParams


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool | None = False

    def params(self, logprobs: bool, default_max: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p,
                              max_tokens=self.max_completion_tokens or self.max_tokens or default_max,
                              stop=tuple(stop), seed=self.seed, logprobs=logprobs, ignore_eos=bool(self.ignore_eos))


class _ChatBody(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: bool | None = False
    continue_final_message: bool | None = False
    add_generation_prompt: bool | None = True


class _CompletionBody(_Common):
    prompt: list[int] | str
    logprobs: int | None = None


def build_app(engine: Engine, model_name: str | None = None, default_max_tokens: int = 256):
    """FastAPI app exposing `engine` at /v1/chat/completions, /v1/completions, /v1/models, /health."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="raydistill engine (OpenAI-compatible)")

    @app.exception_handler(HTTPException)
    async def _openai_error(_: Request, exc: HTTPException) -> JSONResponse:
        # OpenAI clients read {"error": {"message", "type", "code"}}
        return JSONResponse({"error": {"message": str(exc.detail), "type": "BadRequestError",
                                       "code": exc.status_code}}, status_code=exc.status_code)
    name = model_name or engine.model_name

    def _tok_str(tid: int) -> str:
        tok = engine.tokenizer
        return tok.decode([tid]) if tok is not None else str(tid)

    async def _run(body: _Common, make_request: Callable[[], ChatRequest]):
        """The request and sampling params from `body`, generated; bad input or an over-long prompt -> 400."""
        try:
            req = make_request()
            params = body.params(bool(body.logprobs), default_max_tokens)
            return await engine.generate(req, params)
        except PromptTooLongError as e:
            raise HTTPException(400, f"This model's maximum context length was exceeded: {e}") from e
        except (EngineError, ValueError) as e:
            raise HTTPException(400, str(e)) from e

    def _usage(comps) -> dict:
        p = comps[0].prompt_tokens if comps else 0
        c = sum(x.completion_tokens for x in comps)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "raydistill"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: _ChatBody) -> dict:
        msgs = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in body.messages]
        cont = bool(body.continue_final_message) or (body.add_generation_prompt is False and msgs[-1]["role"] == "assistant")
        comps = await _run(body, lambda: ChatRequest(messages=msgs, continue_final_message=cont))
        choices = []
        for i, c in enumerate(comps):
            ch: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": c.text},
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, "logprobs": None}
            if body.logprobs:
                per = _per_token(c)
                ch["logprobs"] = {"content": [{"token": _tok_str(t), "logprob": lp, "bytes": None,
                                               "top_logprobs": []} for t, lp in zip(c.token_ids, per, strict=True)]}
            choices.append(ch)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": choices, "usage": _usage(comps)}

    @app.post("/v1/completions")
    async def completions(body: _CompletionBody) -> dict:
        if isinstance(body.prompt, str):
            if engine.tokenizer is None:
                raise HTTPException(400, "text prompts need an engine with a tokenizer")
            ids = list(engine.tokenizer.encode(body.prompt, add_special_tokens=False))
        else:
            ids = body.prompt
        comps = await _run(body, lambda: ChatRequest(prompt_token_ids=ids))
        choices = []
        for i, c in enumerate(comps):
            ch: dict[str, Any] = {"index": i, "text": c.text, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason, "logprobs": None}
            if body.logprobs:
                ch["logprobs"] = {"tokens": [_tok_str(t) for t in c.token_ids], "token_logprobs": _per_token(c),
                                  "top_logprobs": None, "text_offset": []}
            choices.append(ch)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": choices, "usage": _usage(comps)}

    return app


def _per_token(c) -> list[float]:
    """Per-token logprobs; where a backend kept only the sum, it is spread evenly."""
    n = len(c.token_ids)
    if c.token_logprobs is not None and len(c.token_logprobs) == n:
        return list(c.token_logprobs)
    if n == 0 or c.cumulative_logprob is None:
        return [0.0] * n
    return [c.cumulative_logprob / n] * n
