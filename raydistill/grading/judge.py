"""Optional LLM judge for factual QA against any OpenAI-compatible endpoint (METHOD.md §3).

Temperature 0, structured output (JSON schema: explanation, score 0|1). Servers that reject
`response_format` are detected once and then asked for JSON in plain text instead. Transient failures
(connection, timeout, 429, 5xx) are retried with exponential backoff; a per-item failure or an
unreadable reply becomes a verdict with `score=None` and an `error`, never an exception. Errors that
would hit every item (bad key, unknown model, unset key variable) raise `JudgeError` at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import openai

from raydistill.grading.qa import gold_aliases

log = logging.getLogger(__name__)

SYSTEM_PROMPT = """\
You check answers to factual questions. You get a question, one or more reference answers (each of \
them is fully acceptable), and a candidate answer. Decide whether the candidate answer is correct.

Score 1 (correct) when the candidate names the same entity, value or fact as at least one reference \
answer. Differences in wording, spelling variants, abbreviations, aliases, capitalisation, articles, \
word order or added units do not matter. A longer candidate is fine only if it clearly commits to the \
reference answer and says nothing that contradicts it.

Score 0 (incorrect) when the candidate gives a different answer; gives only part of an answer that \
needs several parts; lists several alternatives without committing to one; hedges or says it does not \
know; or is a verbose passage in which the reference answer is missing or only partly present. Numbers \
and dates must match at the precision the question asks for.

Reply with a JSON object only: {"explanation": "<one or two sentences>", "score": 0 or 1}. \
Write the explanation first, then the score."""

USER_TEMPLATE = """\
Question: {question}
Reference answer(s): {gold}
Candidate answer: {pred}"""

VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "explanation": {"type": "string"},
        "score": {"type": "integer", "enum": [0, 1]},
    },
    "required": ["explanation", "score"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": VERDICT_SCHEMA}}

_RETRYABLE = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
_FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


class JudgeError(RuntimeError):
    """A judge misconfiguration that would fail every item (credentials, model name, key variable)."""


@dataclass
class JudgeVerdict:
    score: int | None
    """1 correct, 0 incorrect, None when no verdict could be obtained (see `error`)."""
    explanation: str = ""
    error: str | None = None
    raw: str | None = None
    """The judge's reply text, kept for auditing malformed output."""

    @property
    def correct(self) -> bool | None:
        return None if self.score is None else self.score == 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "correct": self.correct}


def parse_verdict(text: str | None) -> JudgeVerdict:
    """Read `{"explanation": str, "score": 0|1}` from a reply (bare JSON, fenced, or embedded in prose)."""
    if text is None or not text.strip():
        return JudgeVerdict(score=None, error="judge returned an empty reply", raw=text)
    obj = _find_json_object(text)
    if obj is None:
        return JudgeVerdict(score=None, error="judge reply contains no JSON object", raw=text)
    score = obj.get("score")
    if isinstance(score, str) and score.strip() in ("0", "1"):
        score = int(score.strip())
    elif isinstance(score, float) and score in (0.0, 1.0):
        score = int(score)
    if isinstance(score, bool) or score not in (0, 1):
        return JudgeVerdict(score=None, error=f"judge reply has score {obj.get('score')!r}, expected 0 or 1",
                            raw=text)
    explanation = obj.get("explanation", "")
    if not isinstance(explanation, str):
        explanation = json.dumps(explanation)
    return JudgeVerdict(score=score, explanation=explanation, raw=text)


_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _find_json_object(text: str) -> dict | None:
    candidates = [text.strip(), *(m.strip() for m in _FENCE_RE.findall(text))]
    for c in candidates:
        try:
            obj = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    decoder = json.JSONDecoder()  # first decodable {...} anywhere in the text
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "score" in obj:
            return obj
    return None


def build_messages(question: str, pred: str, gold: str | Sequence[str]) -> list[dict[str, str]]:
    aliases = gold_aliases(gold)
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(question=question.strip(), gold=" | ".join(aliases),
                                                         pred=str(pred).strip())},
    ]


class LLMJudge:
    """An LLM judge over an OpenAI-compatible chat endpoint.

    `api_key_env`: name of the environment variable holding the key (None: local servers that need
    none). `concurrency`: requests in flight per event loop. `timeout`: seconds per request.
    `structured`: None tries JSON-schema output and falls back to plain-text JSON if the server rejects
    it; True/False forces one mode.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 4, backoff_s: float = 0.5,
                 max_tokens: int = 512, structured: bool | None = None):
        if not base_url:
            raise ValueError("LLMJudge: base_url is empty")
        if not model:
            raise ValueError("LLMJudge: model is empty")
        if concurrency < 1:
            raise ValueError(f"LLMJudge: concurrency must be >= 1, got {concurrency}")
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise JudgeError(f"LLMJudge: environment variable {api_key_env} (api_key_env) is not set")
        else:
            api_key = "EMPTY"
        self.base_url, self.model = base_url, model
        self.concurrency, self.timeout = concurrency, timeout
        self.max_retries, self.backoff_s, self.max_tokens = max_retries, backoff_s, max_tokens
        self.structured = structured
        self._api_key = api_key
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[openai.AsyncOpenAI, asyncio.Semaphore]] = (
            weakref.WeakKeyDictionary())

    def _loop_state(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        """Client and semaphore for the running loop (both are bound to the loop that first uses them)."""
        loop = asyncio.get_running_loop()
        state = self._per_loop.get(loop)
        if state is None or state[0].is_closed():
            client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout,
                                        max_retries=0)
            state = (client, asyncio.Semaphore(self.concurrency))
            self._per_loop[loop] = state
        return state

    async def ajudge(self, question: str, pred: Any, gold: str | Sequence[str]) -> JudgeVerdict:
        """One verdict. Raises JudgeError only for misconfiguration; everything else is in the verdict."""
        if pred is None or not str(pred).strip():
            return JudgeVerdict(score=0, explanation="empty prediction (not sent to the judge)")
        messages = build_messages(question, str(pred), gold)
        client, sem = self._loop_state()
        async with sem:
            return await self._request(client, messages)

    async def _request(self, client: openai.AsyncOpenAI, messages: list[dict]) -> JudgeVerdict:
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(30.0, self.backoff_s * 2 ** (attempt - 1)) * (0.75 + 0.5 * random.random())
                await asyncio.sleep(delay)
            use_schema = self.structured is not False
            kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0.0,
                                      "max_tokens": self.max_tokens}
            if use_schema:
                kwargs["response_format"] = RESPONSE_FORMAT
            try:
                resp = await client.chat.completions.create(**kwargs)
            except _FATAL as e:
                raise JudgeError(f"LLM judge at {self.base_url} (model {self.model!r}) refused the request: "
                                 f"{_describe(e)}") from e
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                if use_schema and self.structured is None:
                    log.warning("LLM judge at %s rejected response_format (%s); asking for JSON in text instead",
                                self.base_url, _describe(e))
                    self.structured = False
                    last_error = _describe(e)
                    continue  # retry at once in text mode (the backoff sleep is harmless)
                return JudgeVerdict(score=None, error=f"judge request rejected: {_describe(e)}")
            except _RETRYABLE as e:
                last_error = _describe(e)
                log.info("LLM judge attempt %d failed: %s", attempt + 1, last_error)
                continue
            except openai.APIStatusError as e:  # other 4xx: not transient
                return JudgeVerdict(score=None, error=f"judge request failed: {_describe(e)}")
            if use_schema and self.structured is None:
                self.structured = True
            return _verdict_from_response(resp)
        return JudgeVerdict(score=None, error=f"judge unreachable after {self.max_retries + 1} attempts: "
                                              f"{last_error}")

    async def ajudge_many(self, items: Iterable[tuple[str, Any, str | Sequence[str]]]) -> list[JudgeVerdict]:
        """Verdicts for (question, pred, gold) triples, at most `concurrency` requests in flight."""
        return list(await asyncio.gather(*(self.ajudge(q, p, g) for q, p, g in items)))

    def judge(self, question: str, pred: Any, gold: str | Sequence[str]) -> JudgeVerdict:
        """Synchronous `ajudge` (not callable from inside a running event loop: use `ajudge` there)."""
        return self._run(self.ajudge(question, pred, gold))

    def judge_many(self, items: Iterable[tuple[str, Any, str | Sequence[str]]]) -> list[JudgeVerdict]:
        return self._run(self.ajudge_many(list(items)))

    def _run(self, coro):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError("LLMJudge.judge* called inside a running event loop; await ajudge* instead")

        async def main():
            try:
                return await coro
            finally:
                await self.aclose()

        return asyncio.run(main())

    async def aclose(self) -> None:
        """Close the client of the running loop."""
        state = self._per_loop.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state[0].close()


def _verdict_from_response(resp: Any) -> JudgeVerdict:
    try:
        choice = resp.choices[0]
        text = choice.message.content
        finish = choice.finish_reason
    except (AttributeError, IndexError, TypeError):
        return JudgeVerdict(score=None, error=f"judge response has no choices: {str(resp)[:200]}")
    verdict = parse_verdict(text)
    if verdict.score is None and finish == "length":
        verdict.error = f"{verdict.error} (reply cut off at max_tokens)"
    return verdict


def _describe(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    msg = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}{f' {status}' if status else ''}: {msg[:300]}"
