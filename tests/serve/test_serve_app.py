"""The Serve app for real: local Ray on 127.0.0.1, tiny random-weight student, sandbox actors, HTTP proxy."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import httpx
import psutil
import pytest

from raydistill.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEY_ENV, KEY = "RD_SERVE_TEST_KEY", "k3y-for-the-scripted-app"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCRIPT = ["Thought: look it up, then compute\n```py\nr = web_search('Evan Morris lobbyist')\nprint(r[:300])\n"
          "x = 6 * 7\nprint('x is', x)\n```<end_code>",
          "Thought: answer\n```py\nfinal_answer(x)\n```<end_code>"]


@pytest.fixture(scope="module")
def served(ray_local, tiny_model_dir, small_index, tmp_path_factory):
    """The tiny-model app via the stage's `run` (what `raydistill serve` does), and beside it, deployed
    concurrently to save time, a second app whose student is scripted (exact texts, for the sag test) and
    which has the Retriever deployment over a small real index."""
    from ray import serve

    from raydistill.stages import serve as serve_stage

    port = _free_port()
    base = [f"serve.port={port}", "retrieval.enabled=false", "sandbox.pool.num_actors=1",
            "sandbox.pool.num_cpus_per_actor=0.05"]
    scripted = load_config(None, [*base, *small_index, "retrieval.enabled=true", "student.backend=scripted",
                                  "student.model=scripted",
                                  f"student.script={json.dumps(SCRIPT)}", "student.num_cpus=0.05",
                                  "serve.num_cpus=0.05", "agent.max_steps=3",
                                  f"serve.api_key_env={KEY_ENV}"])
    cfg = load_config(None, [
        *base, f"run_dir={tmp_path_factory.mktemp('run')}", "student.model=tiny:qwen2-tiny",
        "student.max_model_len=2048", "student.num_cpus=0.1", "serve.num_cpus=0.1", "serve.max_request_bytes=4096",
        "serve.max_steps_limit=4", "agent.max_steps=2", "agent.max_new_tokens=8",
    ])
    os.environ[KEY_ENV] = KEY  # the scripted app requires a key; it is read where the app is built
    try:
        scripted_app = serve_stage.build_app(scripted)
    finally:
        os.environ.pop(KEY_ENV)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([serve.RunTarget(scripted_app, name="scripted", route_prefix="/scripted")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    summary = serve_stage.run(cfg)
    assert summary["url"] == f"http://127.0.0.1:{port}"
    yield summary
    serve.shutdown()


def _get(url: str, path: str) -> httpx.Response:
    return httpx.get(url + path, timeout=60)


def _wait_scripted() -> None:
    from ray import serve

    deadline = time.time() + 300
    while str(serve.status().applications["scripted"].status).split(".")[-1] != "RUNNING":
        assert time.time() < deadline, serve.status().applications["scripted"]
        time.sleep(1)


def test_listens_on_loopback_only(served):
    port = served["port"]
    addrs = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
             if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert addrs == {"127.0.0.1"}, addrs


def test_health_models_and_docs(served):
    h = _get(served["url"], "/healthz")
    assert h.status_code == 200, h.text
    body = h.json()
    assert body["status"] == "ok" and body["sandbox_hosts"] == 1
    assert _get(served["url"], "/docs").status_code == 200
    assert "/v1/solve" in _get(served["url"], "/openapi.json").json()["paths"]
    assert _get(served["url"], "/v1/models").json()["data"][0]["id"] == "qwen2-tiny"


def test_solve_returns_trajectory(served):
    r = httpx.post(served["url"] + "/v1/solve", json={"question": "What is 6 times 7?", "domain": "math"},
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    traj = body["trajectory"]
    assert traj["question"] == "What is 6 times 7?" and traj["system_prompt"] == "student"
    assert 1 <= len(traj["steps"]) <= 2 and body["timings"]["num_steps"] == len(traj["steps"])
    assert all(s["raw_text"] is not None for s in traj["steps"])
    assert body["timings"]["total_s"] >= body["timings"]["gen_s"] > 0
    assert body["sag"] is None


def test_solve_with_sag_reports_candidates_and_vote(served):
    r = httpx.post(served["url"] + "/v1/solve", json={"question": "Name a prime.", "max_steps": 1,
                                                      "sag": {"n": 3, "temperature": 0.9, "top_p": 0.95}},
                   timeout=120)
    assert r.status_code == 200, r.text
    sag = r.json()["sag"]
    assert sag["n"] == 3 and len(sag["steps"]) == 1
    step = sag["steps"][0]
    assert step["n"] == 3 and 0 <= step["survived"] <= 3
    assert sag["candidates_total"] == 3
    assert json.loads(r.json()["trajectory"]["steps"][0]["sag"])["n"] == 3


def test_solve_stream_sends_steps_then_result(served):
    with httpx.stream("POST", served["url"] + "/v1/solve", json={"question": "2+2?", "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "start" and events[-2:] == ["result", "done"]
    assert 1 <= events.count("step") <= 2


def test_openai_client_against_chat_route(served):
    import openai

    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", timeout=60)
    out = client.chat.completions.create(model="qwen2-tiny", messages=[{"role": "user", "content": "Hello"}],
                                         max_tokens=5, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens <= 5 and out.usage.prompt_tokens > 0


@pytest.mark.parametrize("content,status", [
    (b"{\"question\": ", 400),
    (b"{\"question\": [1, 2]}", 422),
    (b"{\"question\": \"q\", \"max_steps\": 5}", 422),
    (json.dumps({"question": "x" * 10_000}).encode(), 413),
])
def test_bad_bodies_are_4xx(served, content, status):
    r = httpx.post(served["url"] + "/v1/solve", content=content, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_chat_prompt_over_the_context_is_422_through_serve(served):
    """The engine replica's PromptTooLongError crosses Serve wrapped in a RayTaskError: still a 422 with the
    engine's own message (not a 500 with a remote traceback)."""
    text = "".join(chr(40 + (i * 7) % 50) for i in range(3600))  # ~3,600 tokens, under the 4,096-byte body limit
    r = httpx.post(served["url"] + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": text}], "max_tokens": 2})
    assert r.status_code == 422, r.text
    msg = r.json()["error"]["message"]
    assert "context window is 2048" in msg and "Traceback" not in msg


def test_twenty_concurrent_requests_complete(served):
    async def go():
        async with httpx.AsyncClient(base_url=served["url"], timeout=300) as c:
            return await asyncio.gather(*(
                c.post("/v1/solve", json={"question": f"What is {i} + {i}?", "max_steps": 1,
                                          "max_new_tokens": 4}) for i in range(20)))

    t0 = time.perf_counter()
    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * 20
    assert len({r.json()["id"] for r in rs}) == 20
    assert all(len(r.json()["trajectory"]["steps"]) == 1 for r in rs)
    assert time.perf_counter() - t0 < 240


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_client_disconnect_cancels_episode(served, stream):
    """A long episode (many tokens, many steps) is cancelled when its client goes away mid-generation: the
    ingress counts it cancelled (not completed) and the engine gets no further request for it. The client
    leaves only once the episode's first engine request is in (leaving at `event: start` would cancel it
    before it reached the engine and prove little)."""
    url = served["url"]
    body = {"question": "Think for a long time.", "stream": stream, "max_steps": 4, "max_new_tokens": 400}

    async def go() -> tuple[dict, dict]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            before = (await c.get("/healthz")).json()

            async def call() -> None:
                if not stream:
                    await c.post("/v1/solve", json=body)
                    return
                async with c.stream("POST", "/v1/solve", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass

            task = asyncio.create_task(call())
            deadline = time.time() + 60
            while (await c.get("/healthz")).json()["engine_stats"]["requests"] == before["engine_stats"]["requests"]:
                assert not task.done() and time.time() < deadline, "the episode never reached the engine"
                await asyncio.sleep(0.1)
            task.cancel()  # drops the connection mid-request
            await asyncio.gather(task, return_exceptions=True)
            return before, (await c.get("/healthz")).json()

    before, health = asyncio.run(go())
    assert health["episodes"]["completed"] == before["episodes"]["completed"]
    deadline = time.time() + 60
    while time.time() < deadline:
        health = _get(url, "/healthz").json()
        ep = health["episodes"]
        if ep["active"] == 0 and ep["cancelled"] > before["episodes"]["cancelled"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"episode not cancelled: {ep}")
    assert ep["completed"] == before["episodes"]["completed"]
    assert ep["cancelled"] == before["episodes"]["cancelled"] + 1
    stats = health["engine_stats"]
    # A CPU batch cannot be interrupted: let the cancelled step's decode finish (a live episode would send its
    # next step's request right after it), then check that no request followed.
    deadline = time.time() + 30
    while time.time() < deadline and _get(url, "/healthz").json()["engine_stats"]["batches"] == stats["batches"]:
        time.sleep(0.5)
    time.sleep(1.5)
    assert _get(url, "/healthz").json()["engine_stats"]["requests"] == stats["requests"]


def test_sag_candidates_execute_in_forks_and_vote(served):
    """The scripted student: the 3 sag candidates of each step run in forks of the episode's sandbox on the
    pool actor (each calling web_search, which goes from the sandbox host actor to the Retriever deployment),
    vote, and only the winner's state (x = 42) carries into the next step."""
    _wait_scripted()
    r = httpx.post(served["url"] + "/scripted/v1/solve", json={"question": "6*7?", "sag": {"n": 3}},
                   headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["final_answer"] == "42" and body["error"] is None
    steps = body["trajectory"]["steps"]
    assert len(steps) == 2 and "x is 42" in steps[0]["observation"]
    assert "Retrieved documents:" in steps[0]["observation"] and "Evan Morris" in steps[0]["observation"]
    assert body["trajectory"]["tools"] == ["web_search"]
    assert [s["survived"] for s in body["sag"]["steps"]] == [3, 3]
    assert body["sag"]["steps"][0]["groups"][0][0] == 3  # one group of three identical results
    health = httpx.get(served["url"] + "/scripted/healthz", headers=AUTH, timeout=60).json()
    assert health["sandboxes_open"] == 0  # the episode closed its sandbox and every fork


def test_evaluate_against_the_endpoint(served, tmp_path):
    """`evaluate.endpoint`: agent modes through /v1/solve, CoT through /v1/chat/completions (openai backend)."""
    from raydistill.report import read_results
    from raydistill.stages import evaluate

    cfg = load_config(None, [
        f"run_dir={tmp_path}", f"evaluate.endpoint={served['url']}", "evaluate.model_label=tiny-endpoint",
        "evaluate.sets=[bamboogle_125, gsm_hard_500]", "evaluate.limit=1", "evaluate.modes=[agent, agent_sag, cot]",
        "evaluate.cot_max_new_tokens=6", "retrieval.enabled=false", "agent.max_steps=1", "agent.max_new_tokens=4",
        "agent.sag.n=2",
    ])
    summary = evaluate.run(cfg)
    assert summary["runs"]["tiny-endpoint"]["ran"] == 6
    assert summary["runs"]["tiny-endpoint"]["served_model"] == "qwen2-tiny"
    rows = read_results(tmp_path / "eval" / "results")
    assert sorted((r["mode"], r["benchmark"]) for r in rows) == sorted(
        (m, b) for m in ("agent", "agent_sag", "cot") for b in ("bamboogle_125", "gsm_hard_500"))
    for r in rows:
        assert r["correct"] is not None and not (r["error"] or "").startswith("evaluation:"), r["error"]
        if r["mode"] == "agent_sag":
            assert json.loads(r["steps"][0]["sag"])["n"] == 2
        if r["mode"] == "cot":
            assert r["kind"] == "cot" and r["steps"][0]["completion_tokens"] <= 6
    assert (tmp_path / "eval" / "report.html").exists()
    assert evaluate.is_done(cfg)


def test_api_key_through_serve_http(served):
    """The scripted app (built with serve.api_key_env set) over the real Serve proxy: no key or a wrong key is
    401 on every API route, the right key is 200; /healthz and the docs stay open (probes, no key)."""
    _wait_scripted()
    url = served["url"] + "/scripted"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    solve = {"question": "6*7?", "max_steps": 1}
    for path, body in (("/v1/chat/completions", chat), ("/v1/solve", solve)):
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 401 and "missing Authorization" in r.json()["error"]["message"], (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(url + path, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60)
        assert r.status_code == 401 and "invalid API key" in r.json()["error"]["message"], (path, r.text)
        r = httpx.post(url + path, json=body, headers={"Authorization": f"Basic {KEY}"}, timeout=60)
        assert r.status_code == 401, (path, r.text)
        r = httpx.post(url + path, json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, (path, r.text)
    assert httpx.get(url + "/v1/models", timeout=60).status_code == 401
    assert httpx.get(url + "/v1/models", headers=AUTH, timeout=60).json()["data"][0]["id"] == "scripted"
    # a bad body from an authorised client is still a 4xx, an unauthorised one never reaches the parser
    js = {"content-type": "application/json"}
    assert httpx.post(url + "/v1/solve", content=b"{", headers={**AUTH, **js}, timeout=60).status_code == 400
    assert httpx.post(url + "/v1/solve", content=b"{", headers=js, timeout=60).status_code == 401
    # probes need no key but see only the status; the details need the key
    h = httpx.get(url + "/healthz", timeout=60)
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    h = httpx.get(url + "/healthz", headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert h.status_code == 200 and h.json() == {"status": "ok"}
    h = httpx.get(url + "/healthz", headers=AUTH, timeout=60).json()
    assert h["status"] == "ok" and h["model"] == "scripted" and h["sandbox_hosts"] == 1 and "episodes" in h
    assert httpx.get(url + "/docs", timeout=60).status_code == 200
    assert httpx.get(url + "/openapi.json", timeout=60).status_code == 200
    # the key-less app on the same proxy stays open
    assert httpx.get(served["url"] + "/v1/models", timeout=60).status_code == 200
