"""The Serve app for real: local Ray on 127.0.0.1, tiny random-weight student, sandbox actors, HTTP proxy."""

from __future__ import annotations

import asyncio
import json
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
                                  "serve.num_cpus=0.05", "agent.max_steps=3"])
    cfg = load_config(None, [
        *base, f"run_dir={tmp_path_factory.mktemp('run')}", "student.model=tiny:qwen2-tiny",
        "student.max_model_len=2048", "student.num_cpus=0.1", "serve.num_cpus=0.1", "serve.max_request_bytes=4096",
        "serve.max_steps_limit=4", "agent.max_steps=2", "agent.max_new_tokens=8",
    ])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([serve.RunTarget(serve_stage.build_app(scripted), name="scripted", route_prefix="/scripted")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    summary = serve_stage.run(cfg)
    assert summary["url"] == f"http://127.0.0.1:{port}"
    yield summary
    serve.shutdown()


def _get(url: str, path: str) -> httpx.Response:
    return httpx.get(url + path, timeout=60)


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


def test_client_disconnect_cancels_episode(served):
    """A long episode (many tokens, many steps) is cancelled when its client goes away."""
    url = served["url"]
    before = _get(url, "/healthz").json()["episodes"]
    with httpx.stream("POST", url + "/v1/solve", timeout=60,
                      json={"question": "Think for a long time.", "stream": True, "max_steps": 4,
                            "max_new_tokens": 1500}) as r:
        first = next(r.iter_lines())
        assert first == "event: start"
    # the connection is closed now; the server must notice and cancel the episode
    deadline = time.time() + 60
    while time.time() < deadline:
        ep = _get(url, "/healthz").json()["episodes"]
        if ep["active"] == 0 and ep["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"episode not cancelled: {ep}")
    assert ep["completed"] == before["completed"]


def test_sag_candidates_execute_in_forks_and_vote(served):
    """The scripted student: the 3 sag candidates of each step run in forks of the episode's sandbox on the
    pool actor (each calling web_search, which goes from the sandbox host actor to the Retriever deployment),
    vote, and only the winner's state (x = 42) carries into the next step."""
    from ray import serve

    deadline = time.time() + 300
    while str(serve.status().applications["scripted"].status).split(".")[-1] != "RUNNING":
        assert time.time() < deadline, serve.status().applications["scripted"]
        time.sleep(1)
    r = httpx.post(served["url"] + "/scripted/v1/solve", json={"question": "6*7?", "sag": {"n": 3}},
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["final_answer"] == "42" and body["error"] is None
    steps = body["trajectory"]["steps"]
    assert len(steps) == 2 and "x is 42" in steps[0]["observation"]
    assert "Retrieved documents:" in steps[0]["observation"] and "Evan Morris" in steps[0]["observation"]
    assert body["trajectory"]["tools"] == ["web_search"]
    assert [s["survived"] for s in body["sag"]["steps"]] == [3, 3]
    assert body["sag"]["steps"][0]["groups"][0][0] == 3  # one group of three identical results
    health = _get(served["url"], "/scripted/healthz").json()
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
