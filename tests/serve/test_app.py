"""The HTTP layer without Ray: real tiny-model engine behind the FastAPI app, driven over ASGI."""

from __future__ import annotations

import asyncio
import json
import time

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
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 3000}],
                                                            "max_tokens": 2})
            assert r.status_code == 422 and "context window is 2048" in r.json()["error"]["message"], r.text
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "max_tokens": 2, "continue_final_message": True})
            assert r.status_code == 422 and "assistant" in r.json()["error"]["message"], r.text

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
            h = await c.get("/healthz")  # probes stay open, but see only the status without the key
            assert h.status_code == 200 and h.json() == {"status": "ok"}
            h = await c.get("/healthz", headers={"Authorization": "Bearer s3cret"})
            assert h.json()["status"] == "ok" and h.json()["episodes"]["active"] == 0
            assert (await c.get("/docs")).status_code == 200
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


def test_health_is_503_when_the_backend_fails(engine):
    class Broken(EpisodeBackend):
        async def health(self) -> dict:
            raise RuntimeError("sandbox hosts down")

    app = create_app(Broken(engine), ServeConfig(), AGENT)

    async def go():
        async with _client(app) as c:
            r = await c.get("/healthz")
            assert r.status_code == 503 and r.json()["status"] == "unavailable"
            assert "sandbox hosts down" not in r.text  # details go to the log, not to an open route

    run(go())


def test_disconnect_cancels_episode_under_uvicorn(tmp_path):
    """Plain uvicorn (no Serve): the app's own watcher sees the client leave and cancels the episode."""
    import threading

    import uvicorn

    from raydistill.engines.scripted import ScriptedEngine

    engine = ScriptedEngine(outputs=["Thought: wait\n```py\nx = 1\n```<end_code>"], cycle=True, delay_s=3.0)
    app = create_app(EpisodeBackend(engine, tools={}), ServeConfig(), AgentConfig(max_steps=5))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            assert time.time() < deadline
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/solve", json={"question": "slow"}, timeout=1.0)
        while True:
            ep = httpx.get(url + "/healthz", timeout=10).json()["episodes"]
            if ep["cancelled"] == 1 and ep["active"] == 0:
                break
            assert time.time() < deadline, ep
            time.sleep(0.2)
        assert ep["completed"] == 0
        calls = len(engine.calls)
        time.sleep(3.5)
        assert len(engine.calls) == calls  # the episode made no further engine calls after it was cancelled
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_serve_config_yaml_builds_the_app(monkeypatch):
    """configs/serve_app.yaml: valid for Serve's schema, and its import path + args build an Application."""
    from pathlib import Path

    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from raydistill.stages.serve import build_app, config_from_args

    repo = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((repo / "configs" / "serve_app.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    assert schema.http_options.host == "127.0.0.1"
    [app_doc] = doc["applications"]
    assert app_doc["import_path"] == "raydistill.stages.serve:build_app"
    args = {**app_doc["args"], "config": str(repo / app_doc["args"]["config"]), "serve.max_sag_n": 4,
            "retrieval.enabled": False}
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    assert isinstance(app, Application)
    cfg = config_from_args(args)
    assert cfg.serve.max_sag_n == 4 and cfg.retrieval.enabled is False and cfg.student.model == "tiny:qwen2-tiny"
    with pytest.raises(Exception, match="unknown key"):
        config_from_args({"serve.no_such_key": 1})
