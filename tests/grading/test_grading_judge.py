"""LLMJudge against a real OpenAI-compatible HTTP server on 127.0.0.1.

The server is a small FastAPI app (test infrastructure standing in for vLLM / an API); the judge's
client path (openai.AsyncOpenAI over HTTP, retries, fallbacks, parsing) is the real one.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from raydistill.grading.judge import JudgeError, JudgeVerdict, LLMJudge, parse_verdict


class Stub:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.attempts: Counter[str] = Counter()
        self.inflight = 0
        self.max_inflight = 0


def _completion(model: str, content: str, finish: str = "stop") -> dict:
    return {
        "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                        status_code=status)


def _stub_verdict(user: str) -> dict:
    """A crude stand-in for an LLM: correct iff the candidate is short and contains a reference alias."""
    gold = re.search(r"^Reference answer\(s\): (.*)$", user, re.M).group(1)
    cand = re.search(r"^Candidate answer: (.*)$", user, re.M).group(1)
    aliases = [a.strip().lower() for a in gold.split("|")]
    ok = any(a in cand.lower() for a in aliases) and len(cand) <= 3 * max(map(len, aliases)) + 10
    return {"explanation": f"candidate {'matches' if ok else 'does not match'} the reference", "score": int(ok)}


def make_app(stub: Stub) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        stub.requests.append({"body": body, "auth": request.headers.get("authorization")})
        model, user = body["model"], body["messages"][-1]["content"]
        stub.attempts[f"{model}:{user}"] += 1
        attempt = stub.attempts[f"{model}:{user}"]
        if model == "judge-structured":
            if body.get("response_format", {}).get("type") != "json_schema":
                return _error(400, "this stub wants a json_schema response_format")
            return _completion(model, json.dumps(_stub_verdict(user)))
        if model == "judge-text-only":
            if "response_format" in body:
                return _error(400, "response_format is not supported by this server")
            return _completion(model, "Verdict follows.\n```json\n" + json.dumps(_stub_verdict(user)) + "\n```")
        if model == "judge-garbage":
            return _completion(model, "I believe the answer is right.")
        if model == "judge-bad-score":
            return _completion(model, '{"explanation": "meh", "score": 7}')
        if model == "judge-length":
            return _completion(model, '{"explanation": "the candidate', finish="length")
        if model == "judge-flaky":
            if attempt <= 2:
                return _error(503, "overloaded, try again")
            return _completion(model, json.dumps(_stub_verdict(user)))
        if model == "judge-down":
            return _error(500, "internal error")
        if model == "judge-slow":
            await asyncio.sleep(2.0)
            return _completion(model, json.dumps(_stub_verdict(user)))
        if model == "judge-concurrency":
            stub.inflight += 1
            stub.max_inflight = max(stub.max_inflight, stub.inflight)
            try:
                await asyncio.sleep(0.2)
            finally:
                stub.inflight -= 1
            return _completion(model, json.dumps(_stub_verdict(user)))
        if model == "judge-auth":
            if request.headers.get("authorization") != "Bearer sekrit":
                return _error(401, "invalid api key")
            return _completion(model, json.dumps(_stub_verdict(user)))
        return _error(404, f"model {model!r} not found")

    return app


@pytest.fixture(scope="module")
def server():
    stub = Stub()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(stub), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "stub server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", stub
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


ITEMS = [
    ("Which city hosts the Louvre?", "Paris", "Paris"),
    ("Who was the 37th US president?", "Nixon", ["Richard Nixon", "Nixon"]),
    ("Who was the 37th US president?", "Gerald Ford", ["Richard Nixon", "Nixon"]),
    ("Capital of Australia?", "It could be Sydney, Melbourne or Canberra, historians have long argued about it",
     "Canberra"),
]
EXPECTED = [1, 1, 0, 0]


def test_structured_output_request_and_verdicts(server):
    url, stub = server
    judge = LLMJudge(url, "judge-structured", backoff_s=0.01)
    verdicts = judge.judge_many(ITEMS)
    assert [v.score for v in verdicts] == EXPECTED
    assert [v.correct for v in verdicts] == [True, True, False, False]
    assert all(v.error is None and v.explanation for v in verdicts)
    assert judge.structured is True
    body = [r["body"] for r in stub.requests if r["body"]["model"] == "judge-structured"][-1]
    assert body["temperature"] == 0.0
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["explanation", "score"] and schema["properties"]["score"]["enum"] == [0, 1]
    assert body["messages"][0]["role"] == "system" and "verbose" in body["messages"][0]["content"]
    user = [r["body"]["messages"][-1]["content"] for r in stub.requests if "Gerald" in json.dumps(r["body"])][0]
    assert "Reference answer(s): Richard Nixon | Nixon" in user
    assert verdicts[0].to_dict()["correct"] is True
    from raydistill.grading import LLMJudge as Exported  # lazy re-export from the package

    assert Exported is LLMJudge


def test_falls_back_to_json_in_text_when_response_format_is_rejected(server):
    url, stub = server
    judge = LLMJudge(url, "judge-text-only", backoff_s=0.01)
    before = len(stub.requests)
    assert [judge.judge(*item).score for item in ITEMS] == EXPECTED
    sent = [r["body"] for r in stub.requests[before:]]
    assert judge.structured is False
    assert sum("response_format" in b for b in sent) == 1  # rejected once, then never sent again
    assert len(sent) == len(ITEMS) + 1


@pytest.mark.parametrize(("model", "error"), [
    ("judge-garbage", "no JSON object"),
    ("judge-bad-score", "score 7, expected 0 or 1"),
    ("judge-length", "cut off at max_tokens"),
])
def test_malformed_judge_output_gives_a_verdict_of_none_with_an_error(server, model, error):
    url, _ = server
    v = LLMJudge(url, model, structured=False, backoff_s=0.01).judge(*ITEMS[0])
    assert v.score is None and v.correct is None
    assert error in v.error
    assert v.raw is not None  # kept for auditing


def test_transient_errors_are_retried_with_backoff(server):
    url, stub = server
    v = LLMJudge(url, "judge-flaky", max_retries=3, backoff_s=0.01).judge(*ITEMS[0])
    assert v.score == 1 and v.error is None
    assert stub.attempts[f"judge-flaky:{_user_of(stub, 'judge-flaky')}"] == 3

    t0 = time.monotonic()
    v = LLMJudge(url, "judge-down", max_retries=2, backoff_s=0.01).judge(*ITEMS[0])
    assert v.score is None and "unreachable after 3 attempts" in v.error and "500" in v.error
    assert time.monotonic() - t0 < 10


def _user_of(stub: Stub, model: str) -> str:
    return next(r["body"]["messages"][-1]["content"] for r in stub.requests if r["body"]["model"] == model)


def test_request_timeout_becomes_a_none_verdict(server):
    url, _ = server
    t0 = time.monotonic()
    v = LLMJudge(url, "judge-slow", timeout=0.3, max_retries=1, backoff_s=0.01).judge(*ITEMS[0])
    assert v.score is None and "Timeout" in v.error
    assert time.monotonic() - t0 < 1.9  # two attempts of 0.3 s, not the server's 2 s


def test_concurrency_limit_is_respected(server):
    url, stub = server
    judge = LLMJudge(url, "judge-concurrency", concurrency=3)
    items = [(f"q{i}", "Paris", "Paris") for i in range(9)]
    verdicts = judge.judge_many(items)
    assert [v.score for v in verdicts] == [1] * 9
    assert 2 <= stub.max_inflight <= 3  # parallel, but never above the limit


def test_api_key_from_environment_and_configuration_errors(server, monkeypatch):
    url, stub = server
    monkeypatch.setenv("JUDGE_TEST_KEY", "sekrit")
    assert LLMJudge(url, "judge-auth", api_key_env="JUDGE_TEST_KEY").judge(*ITEMS[0]).score == 1
    assert stub.requests[-1]["auth"] == "Bearer sekrit"
    monkeypatch.setenv("JUDGE_TEST_KEY", "wrong")
    with pytest.raises(JudgeError, match="401"):
        LLMJudge(url, "judge-auth", api_key_env="JUDGE_TEST_KEY").judge(*ITEMS[0])
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(JudgeError, match="JUDGE_TEST_KEY"):
        LLMJudge(url, "judge-auth", api_key_env="JUDGE_TEST_KEY")
    with pytest.raises(JudgeError, match="no-such-model"):
        LLMJudge(url, "no-such-model").judge(*ITEMS[0])
    with pytest.raises(ValueError, match="concurrency"):
        LLMJudge(url, "x", concurrency=0)


def test_async_use_and_sync_call_inside_a_loop(server):
    url, _ = server
    judge = LLMJudge(url, "judge-structured", backoff_s=0.01)

    async def main():
        v = await judge.ajudge(*ITEMS[0])
        with pytest.raises(RuntimeError, match="running event loop"):
            judge.judge(*ITEMS[0])
        await judge.aclose()
        return v

    assert asyncio.run(main()).score == 1
    assert asyncio.run(main()).score == 1  # a new loop gets a new client


def test_empty_prediction_is_wrong_without_a_request(server):
    url, stub = server
    before = len(stub.requests)
    v = LLMJudge(url, "judge-structured").judge("q", "  ", "Paris")
    assert v.score == 0 and len(stub.requests) == before


@pytest.mark.parametrize(("text", "score"), [
    ('{"explanation": "ok", "score": 1}', 1),
    ('```json\n{"explanation": "no", "score": 0}\n```', 0),
    ('Sure. {"explanation": "fine", "score": "1"} Done.', 1),
    ('{"score": 1.0, "explanation": "x"}', 1),
    ('{"explanation": "x", "score": true}', None),
    ('{"explanation": "x"}', None),
    ("[1, 0]", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(text, score):
    v = parse_verdict(text)
    assert isinstance(v, JudgeVerdict) and v.score == score
    assert (v.error is None) == (score is not None)
