"""The openai backend against real HTTP servers on 127.0.0.1 (our OpenAI-compatible app over the
transformers engine, plus small misbehaving servers for retries, timeouts and the concurrency limit)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from raydistill.config.engine import EngineConfig
from raydistill.engines import ChatRequest, EngineError, PromptTooLongError, SamplingParams, create_engine


@contextlib.contextmanager
def serve(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not th.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        th.join(10)


@pytest.fixture(scope="module")
def server_url(tf_engine):
    from raydistill.engines.openai_server import build_app

    with serve(build_app(tf_engine, model_name="tiny")) as url:
        yield url


def client(url, tiny_model_dir=None, **kw):
    return create_engine(EngineConfig(backend="openai", model="tiny", base_url=url, tokenizer=tiny_model_dir, **kw))


def msgs(q="hello"):
    return [{"role": "system", "content": "s"}, {"role": "user", "content": q}]


def test_chat_matches_the_engine_behind_the_server(server_url, tf_engine, tiny_model_dir):
    eng = client(server_url, tiny_model_dir)
    p = SamplingParams(max_tokens=10, ignore_eos=True)
    [remote] = asyncio.run(eng.generate(ChatRequest(messages=msgs()), p))
    [local] = asyncio.run(tf_engine.generate(ChatRequest(messages=msgs()), p))
    assert remote.text == local.text and remote.prompt_tokens == local.prompt_tokens
    assert remote.completion_tokens == 10 and remote.finish_reason == "length"


def test_n_logprobs_seed_and_stop(server_url, tf_engine, tiny_model_dir):
    eng = client(server_url, tiny_model_dir)
    p = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=11, logprobs=True, ignore_eos=True)
    out = asyncio.run(eng.generate(ChatRequest(messages=msgs("n")), p))
    local = asyncio.run(tf_engine.generate(ChatRequest(messages=msgs("n")), p))
    assert [c.text for c in out] == [c.text for c in local]
    for r, lc in zip(out, local, strict=True):
        assert r.completion_tokens == 12
        assert r.cumulative_logprob == pytest.approx(lc.cumulative_logprob, abs=1e-3)
    one = p.replace(n=1)
    text = asyncio.run(tf_engine.generate(ChatRequest(messages=msgs("n")), one))[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    [cut] = asyncio.run(eng.generate(ChatRequest(messages=msgs("n")), one.replace(stop=(stop,))))
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and cut.text == text[: text.find(stop)]


def test_continue_final_message_and_token_prompts(server_url, tf_engine):
    eng = client(server_url)
    req = ChatRequest(messages=[*msgs(), {"role": "assistant", "content": "Thought: first.\n\n"}],
                      continue_final_message=True)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    [remote] = asyncio.run(eng.generate(req, p))
    [local] = asyncio.run(tf_engine.generate(req, p))
    assert remote.text == local.text and remote.prompt_tokens == local.prompt_tokens
    [tok] = asyncio.run(eng.generate(ChatRequest(prompt_token_ids=[7, 8, 9]), SamplingParams(max_tokens=4,
                                                                                              ignore_eos=True)))
    assert tok.prompt_tokens == 3 and tok.completion_tokens == 4
    with pytest.raises(PromptTooLongError):
        asyncio.run(eng.generate(ChatRequest(prompt_token_ids=[7] * 3000), SamplingParams(max_tokens=4)))


def _canned(n=1):
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": i, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
                        for i in range(n)],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def test_retries_with_backoff_then_success():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app, hits = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def flaky():
        hits.append(time.time())
        if len(hits) <= 2:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        return _canned()

    with serve(app) as url:
        eng = create_engine(EngineConfig(backend="openai", model="m", base_url=url, max_retries=3))
        eng.backoff_s = 0.05
        [c] = asyncio.run(eng.generate(ChatRequest(messages=msgs()), SamplingParams()))
    assert c.text == "ok" and len(hits) == 3 and eng.stats()["retries"] == 2
    assert hits[2] - hits[1] >= hits[1] - hits[0] > 0.04  # exponential backoff


def test_timeout_gives_up_after_retries_and_4xx_is_not_retried():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app, hits = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def slow(body: dict):
        hits.append(body["messages"][-1]["content"])
        if body["messages"][-1]["content"] == "bad":
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        await asyncio.sleep(3)
        return _canned()

    with serve(app) as url:
        eng = create_engine(EngineConfig(backend="openai", model="m", base_url=url, max_retries=1,
                                         request_timeout_s=0.3))
        eng.backoff_s = 0.01
        t0 = time.time()
        with pytest.raises(EngineError, match="after 2 tries"):
            asyncio.run(eng.generate(ChatRequest(messages=msgs("slow")), SamplingParams()))
        assert time.time() - t0 < 2.5
        with pytest.raises(EngineError, match="bad request"):
            asyncio.run(eng.generate(ChatRequest(messages=msgs("bad")), SamplingParams()))
    assert hits.count("slow") == 2 and hits.count("bad") == 1


def test_concurrency_limit():
    from fastapi import FastAPI

    app, state = FastAPI(), {"now": 0, "max": 0}

    @app.post("/v1/chat/completions")
    async def counted():
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        await asyncio.sleep(0.1)
        state["now"] -= 1
        return _canned()

    with serve(app) as url:
        eng = create_engine(EngineConfig(backend="openai", model="m", base_url=url, max_concurrency=2))

        async def many():
            return await asyncio.gather(*(eng.generate(ChatRequest(messages=msgs()), SamplingParams())
                                          for _ in range(6)))

        assert len(asyncio.run(many())) == 6
    assert state["max"] == 2


def test_missing_key_and_url_are_clear_errors(monkeypatch):
    monkeypatch.delenv("RAYDISTILL_TEST_KEY", raising=False)
    with pytest.raises(EngineError, match="RAYDISTILL_TEST_KEY"):
        create_engine(EngineConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1",
                                   api_key_env="RAYDISTILL_TEST_KEY"))
    with pytest.raises(EngineError, match="base_url"):
        create_engine(EngineConfig(backend="openai", model="m"))
