"""The student endpoint as a FastAPI app, independent of how episodes are run.

`create_app(backend, serve_cfg, agent_cfg)` wires routes, limits and errors; a `SolveBackend` runs the
episodes and talks to the engine. `LocalBackend` (in-process engine and sandboxes) serves tests and single
machines; the Ray Serve ingress (raydistill.stages.serve) supplies a backend whose engine, sandboxes and
retriever are Serve deployments. Bad requests are 4xx with a message, never 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raydistill.agent.trajectory import Step, Trajectory
from raydistill.config.agent import AgentConfig, SagConfig
from raydistill.config.serve import ServeConfig
from raydistill.data.records import Record
from raydistill.engines.base import PromptTooLongError
from raydistill.serving.middleware import ApiKeyMiddleware, BodyLimitMiddleware, error_payload, key_digest
from raydistill.serving.models import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    SolveRequest,
    SolveResponse,
    Usage,
    sag_summary,
    timings,
)

log = logging.getLogger(__name__)

StepCallback = Callable[[int, Step], Awaitable[None]]


class SolveBackend(Protocol):
    """What the HTTP layer needs from whoever runs episodes."""

    model_name: str

    async def solve(self, question: Record, agent_cfg: AgentConfig, on_step: StepCallback | None) -> Trajectory:
        """One student episode; `on_step(i, step)` is awaited as each step is committed."""

    async def chat(self, messages: list[dict], params: dict, continue_final_message: bool) -> list[Any]:
        """One engine request -> `params["n"]` engine Completions (text, token counts, finish_reason)."""

    async def health(self) -> dict:
        """Backend-specific health details; raise if not ready."""


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """SHA-256 of the key named by `serve.api_key_env` (None: no key configured). A configured but unset
    variable is an error, not an open door."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key.strip():
        raise ValueError(f"serve.api_key_env={cfg.api_key_env!r} but that environment variable is not set "
                         "(or empty); set it, or unset serve.api_key_env to serve without a key")
    return key_digest(key.strip())


class _Counters:
    def __init__(self) -> None:
        self.active = 0
        self.completed = 0
        self.cancelled = 0
        self.timed_out = 0
        self.failed = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _sse(event: str, data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, default=str)
    return f"event: {event}\ndata: {payload}\n\n".encode()


def _agent_cfg_for(req: SolveRequest, base: AgentConfig) -> AgentConfig:
    update: dict[str, Any] = {}
    if req.max_steps is not None:
        update["max_steps"] = req.max_steps
    if req.max_new_tokens is not None:
        update["max_new_tokens"] = req.max_new_tokens
    if req.sag is not None:
        update["sag"] = SagConfig(enabled=True, n=req.sag.n, temperature=req.sag.temperature, top_p=req.sag.top_p)
    else:
        update["sag"] = base.sag.model_copy(update={"enabled": False})
    return base.model_copy(update=update)


def _check_limits(req: SolveRequest, cfg: ServeConfig) -> None:
    problems = []
    if req.max_steps is not None and req.max_steps > cfg.max_steps_limit:
        problems.append(f"max_steps={req.max_steps} is above the server limit {cfg.max_steps_limit}")
    if req.sag is not None and req.sag.n > cfg.max_sag_n:
        problems.append(f"sag.n={req.sag.n} is above the server limit {cfg.max_sag_n}")
    if req.max_new_tokens is not None and req.max_new_tokens > cfg.max_new_tokens_limit:
        problems.append(f"max_new_tokens={req.max_new_tokens} is above the server limit {cfg.max_new_tokens_limit}")
    if len(req.question) > cfg.max_question_chars:
        problems.append(f"question has {len(req.question)} characters; the limit is {cfg.max_question_chars}")
    if problems:
        raise HTTPException(422, "; ".join(problems))


async def _cancel(task: asyncio.Task) -> None:
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def create_app(backend: SolveBackend, serve_cfg: ServeConfig, agent_cfg: AgentConfig, *,
               watch_disconnect: bool = True, api_key_sha256: str | None | bool = True) -> FastAPI:
    """Build the app. `watch_disconnect`: poll for client disconnects ourselves (plain uvicorn); Ray Serve
    cancels a disconnected request's handler itself. `api_key_sha256`: digest of the required key; True
    (default) reads the key named by `serve.api_key_env` here; None/False: no key."""
    api_key = resolve_api_key(serve_cfg) if api_key_sha256 is True else (api_key_sha256 or None)
    counters = _Counters()
    app = FastAPI(
        title="raydistill student agent",
        description="A distilled small agent that thinks, writes Python, searches a corpus and answers. "
                    "`/v1/solve` runs an episode (optionally with self-consistent action generation); "
                    "`/v1/chat/completions` is an OpenAI-compatible pass-through to the student model.",
        version="1",
        responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                   422: {"model": ErrorResponse}, 504: {"model": ErrorResponse}},
    )
    # Outermost last: the key is checked before a body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=serve_cfg.max_request_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key_sha256=api_key)
    app.state.counters = counters

    # ---------------------------------------------------------------- errors
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        bad_json = [e for e in errors if e.get("type") == "json_invalid"]
        if bad_json:
            ctx = bad_json[0].get("ctx") or {}
            msg = f"malformed JSON body: {ctx.get('error', bad_json[0].get('msg'))}"
            return JSONResponse(error_payload(400, msg, "invalid_json"), status_code=400)
        parts = []
        for e in errors:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{loc}: {e.get('msg')}")
        return JSONResponse(error_payload(422, "; ".join(parts), "invalid_request"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                422: "invalid_request", 504: "timeout"}.get(exc.status_code, "error")
        return JSONResponse(error_payload(exc.status_code, str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_payload(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error"),
                            status_code=500)

    # ---------------------------------------------------------------- routes
    @app.get("/healthz", summary="Liveness and readiness, with episode counters",
             description="Open to probes without the API key. With a key configured, a caller without it gets "
                         "only `{\"status\"}`; the details (engine, adapter, counters) need the key. 503 while "
                         "the engine or sandboxes do not answer.")
    async def healthz(request: Request):
        try:
            details = await backend.health()
        except Exception as e:
            log.warning("health check failed: %s: %s", type(e).__name__, e)
            return JSONResponse({"status": "unavailable", **error_payload(503, "backend not ready", "unavailable")},
                                status_code=503)
        if api_key and not getattr(request.state, "api_key_ok", False):
            return {"status": "ok"}
        return {"status": "ok", "model": backend.model_name, "episodes": counters.as_dict(), **details}

    @app.get("/v1/models", summary="The served model (OpenAI-compatible)")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "owned_by": "raydistill"}]}

    @app.post("/v1/solve", response_model=SolveResponse,
              summary="Run the student agent on a question; stream=true gives server-sent events per step")
    async def solve(req: SolveRequest, request: Request):
        _check_limits(req, serve_cfg)
        cfg = _agent_cfg_for(req, agent_cfg)
        record = Record(id=req.id or f"req-{uuid.uuid4().hex[:12]}", question=req.question, answer=[],
                        domain=req.domain, source="serve")
        if req.stream:
            return StreamingResponse(_stream(req, record, cfg), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        start = time.perf_counter()
        counters.active += 1
        task = asyncio.create_task(backend.solve(record, cfg, None))
        watcher = asyncio.create_task(_watch(request, task)) if watch_disconnect else None
        try:
            traj = await asyncio.wait_for(asyncio.shield(task), timeout=serve_cfg.request_timeout_s)
        except TimeoutError:
            counters.timed_out += 1
            raise HTTPException(504, f"episode did not finish within {serve_cfg.request_timeout_s}s") from None
        except asyncio.CancelledError:
            counters.cancelled += 1
            if watcher is not None and watcher.done() and not watcher.cancelled() and watcher.result():
                # our watcher cancelled the episode because the client left: nobody reads this answer
                return JSONResponse(error_payload(499, "client disconnected", "cancelled"), status_code=499)
            raise
        except Exception:
            counters.failed += 1  # infrastructure failure (model misbehaviour is recorded in the trajectory)
            raise
        finally:
            counters.active -= 1
            await _cancel(task)
            if watcher is not None:
                await _cancel(watcher)
        counters.completed += 1
        return _response(req, record, traj, time.perf_counter() - start)

    async def _watch(request: Request, task: asyncio.Task) -> bool:
        while not task.done():
            if await request.is_disconnected():
                log.info("client disconnected; cancelling its episode")
                task.cancel()
                return True
            await asyncio.sleep(0.2)
        return False

    async def _stream(req: SolveRequest, record: Record, cfg: AgentConfig) -> AsyncIterator[bytes]:
        start = time.perf_counter()
        queue: asyncio.Queue = asyncio.Queue()

        async def on_step(i: int, step: Step) -> None:
            await queue.put(("step", {"index": i, **step.model_dump()}))

        counters.active += 1
        task = asyncio.create_task(backend.solve(record, cfg, on_step))
        task.add_done_callback(lambda _: queue.put_nowait(("done", None)))
        deadline = start + serve_cfg.request_timeout_s
        finished = False
        try:
            yield _sse("start", {"id": record.id, "model": backend.model_name})
            while True:
                remaining = deadline - time.perf_counter()
                try:
                    kind, data = await asyncio.wait_for(queue.get(), timeout=max(remaining, 0.001))
                except TimeoutError:
                    counters.timed_out += 1
                    finished = True
                    yield _sse("error", error_payload(504, f"episode did not finish within "
                                                      f"{serve_cfg.request_timeout_s}s", "timeout"))
                    return
                if kind == "step":
                    yield _sse("step", data)
                    continue
                finished = True
                if task.cancelled():
                    yield _sse("error", error_payload(503, "episode was cancelled", "cancelled"))
                elif task.exception() is not None:
                    counters.failed += 1
                    exc = task.exception()
                    yield _sse("error", error_payload(500, f"episode failed: {type(exc).__name__}: {exc}",
                                                      "internal_error"))
                else:
                    counters.completed += 1
                    resp = _response(req, record, task.result(), time.perf_counter() - start)
                    yield _sse("result", resp.model_dump(mode="json"))
                yield _sse("done", "[DONE]")
                return
        finally:
            counters.active -= 1
            if not finished:  # the client went away (generator closed or cancelled) before the end
                counters.cancelled += 1
            await _cancel(task)

    def _response(req: SolveRequest, record: Record, traj: Trajectory, total_s: float) -> SolveResponse:
        return SolveResponse(id=record.id, final_answer=traj.final_answer, max_steps_reached=traj.max_steps_reached,
                             error=traj.error, trajectory=traj, timings=timings(traj, total_s),
                             sag=sag_summary(traj, req.sag))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              summary="OpenAI-compatible chat completion from the student model")
    async def chat(req: ChatCompletionRequest):
        max_tokens = req.new_tokens(min(1024, serve_cfg.max_new_tokens_limit))
        problems = []
        if max_tokens > serve_cfg.max_new_tokens_limit:
            problems.append(f"max_tokens={max_tokens} is above the server limit {serve_cfg.max_new_tokens_limit}")
        if req.n > serve_cfg.max_sag_n:
            problems.append(f"n={req.n} is above the server limit {serve_cfg.max_sag_n}")
        if req.model and req.model != backend.model_name:
            problems.append(f"model {req.model!r} is not served here; this endpoint serves {backend.model_name!r}")
        if problems:
            raise HTTPException(422, "; ".join(problems))
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        params = {"n": req.n, "temperature": req.temperature, "top_p": req.top_p, "max_tokens": max_tokens,
                  "stop": tuple(req.stop_list()), "seed": req.seed}
        try:
            completions = await asyncio.wait_for(backend.chat(messages, params, req.continue_final_message),
                                                 timeout=serve_cfg.request_timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"completion did not finish within {serve_cfg.request_timeout_s}s") from None
        except (ValueError, PromptTooLongError) as e:  # the engine rejects the input (e.g. longer than the context)
            raise HTTPException(422, _cause_message(e)) from None
        choices = [ChatChoice(index=i, message={"role": "assistant", "content": c.text},
                              finish_reason=_finish(c.finish_reason)) for i, c in enumerate(completions)]
        prompt_tokens = completions[0].prompt_tokens if completions else 0
        completion_tokens = sum(c.completion_tokens for c in completions)
        resp = ChatCompletionResponse(model=backend.model_name, choices=choices,
                                      usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                  total_tokens=prompt_tokens + completion_tokens))
        if not req.stream:
            return resp

        async def chunks() -> AsyncIterator[bytes]:
            for ch in resp.choices:
                yield _chunk(resp, ch.index, {"role": "assistant", "content": ch.message["content"]}, None)
                yield _chunk(resp, ch.index, {}, ch.finish_reason)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


def _cause_message(e: BaseException) -> str:
    """The engine's own message: under Ray Serve the error arrives wrapped (a RayTaskError that is also an instance
    of the cause's class) whose str() holds a remote traceback; `cause` is the original exception."""
    cause = getattr(e, "cause", None)
    return str(cause if isinstance(cause, BaseException) else e)


def _finish(reason: str | None) -> str | None:
    if reason in (None, "stop", "length"):
        return reason
    return "stop"  # stop-string and eos both surface as "stop" to OpenAI clients


def _chunk(resp: ChatCompletionResponse, index: int, delta: dict, finish: str | None) -> bytes:
    body = {"id": resp.id, "object": "chat.completion.chunk", "created": resp.created, "model": resp.model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()
