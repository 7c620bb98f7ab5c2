"""The HTTP layer without Ray: real tiny-model engine behind the FastAPI app, driven over ASGI."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from raydistill.config.agent import AgentConfig
from raydistill.config.engine import EngineConfig
from raydistill.config.serve import ServeConfig
from raydistill.engines import create_engine
from raydistill.serving import EpisodeBackend, create_app
from raydistill.serving.middleware import key_digest

AGENT = AgentConfig(max_steps=2, max_new_tokens=8)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return create_engine(EngineConfig(backend="transformers", model="tiny:qwen2-tiny", max_model_len=2048))


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")


def run(coro):
    return asyncio.run(coro)


def test_health_docs_and_models(engine):
    app = create_app(EpisodeBackend(engine), ServeConfig(), AGENT)

    async def go():
        async with _client(app) as c:
            h = await c.get("/healthz")
            assert h.status_code == 200 and h.json()["status"] == "ok"
            assert h.json()["episodes"]["active"] == 0
            spec = (await c.get("/openapi.json")).json()
            assert {"/v1/solve", "/v1/chat/completions", "/healthz"} <= set(spec["paths"])
            assert (await c.get("/docs")).status_code == 200
            m = (await c.get("/v1/models")).json()
            assert m["data"][0]["id"] == engine.model_name

    run(go())


def test_chat_completion_openai_shape(engine):
    app = create_app(EpisodeBackend(engine), ServeConfig(), AGENT)

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 6, "n": 2,
                "temperature": 0.7, "seed": 1, "user": "ignored-extra-field"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "chat.completion" and len(body["choices"]) == 2
            assert all(ch["message"]["role"] == "assistant" for ch in body["choices"])
            assert 0 < body["usage"]["completion_tokens"] <= 12
            s = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            events = [line for line in s.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"

    run(go())


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"question": 5}', 422, "question"),
    (b'{"question": "   "}', 422, "blank"),
    (b'{"question": "q", "max_steps": "many"}', 422, "max_steps"),
    (b'{"question": "q", "max_steps": 99}', 422, "server limit"),
    (b'{"question": "q", "sag": {"n": 0}}', 422, "sag.n"),
    (b'{"question": "q", "sag": {"n": 999}}', 422, "sag.n=999"),
    (b'{"question": "q", "unknown": 1}', 422, "unknown"),
    (b'[]', 422, "body"),
])
def test_bad_solve_requests_are_4xx_with_message(engine, body, status, needle):
    app = create_app(EpisodeBackend(engine), ServeConfig(max_steps_limit=5), AGENT)

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/solve", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, r.text
            assert needle in r.json()["error"]["message"], r.json()

    run(go())


def test_bad_chat_requests(engine):
    app = create_app(EpisodeBackend(engine), ServeConfig(max_new_tokens_limit=16), AGENT)

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/chat/completions", json={"messages": []})
            assert r.status_code == 422
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "max_tokens": 10_000})
            assert r.status_code == 422 and "max_tokens" in r.json()["error"]["message"]
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "model": "gpt-9"})
            assert r.status_code == 422 and "not served" in r.json()["error"]["message"]
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
            assert r.status_code == 422

    run(go())


def test_oversized_body_is_413_by_header_and_by_stream(engine):
    app = create_app(EpisodeBackend(engine), ServeConfig(max_request_bytes=2048), AGENT)
    big = json.dumps({"question": "x" * 5000}).encode()

    async def chunks():
        for i in range(0, len(big), 512):
            yield big[i:i + 512]

    async def go():
        async with _client(app) as c:
            r = await c.post("/v1/solve", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
            r = await c.post("/v1/solve", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413
            r = await c.post("/v1/solve", content=b"{}", headers={"content-length": "abc"})
            assert r.status_code == 400

    run(go())


def test_api_key(engine, monkeypatch):
    monkeypatch.setenv("RD_TEST_KEY", "s3cret")
    cfg = ServeConfig(api_key_env="RD_TEST_KEY")
    app = create_app(EpisodeBackend(engine), cfg, AGENT)
    msg = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def go():
        async with _client(app) as c:
            assert (await c.get("/healthz")).status_code == 200  # probes stay open
            r = await c.post("/v1/chat/completions", json=msg)
            assert r.status_code == 401 and "Authorization" in r.json()["error"]["message"]
            r = await c.post("/v1/chat/completions", json=msg, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401 and "invalid" in r.json()["error"]["message"]
            r = await c.post("/v1/chat/completions", json=msg, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200

    run(go())
    assert key_digest("s3cret") != "s3cret"
    monkeypatch.delenv("RD_TEST_KEY")
    with pytest.raises(ValueError, match="RD_TEST_KEY"):
        create_app(EpisodeBackend(engine), cfg, AGENT)
