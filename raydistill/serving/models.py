"""HTTP request/response bodies of the student endpoint (pydantic: they are also the OpenAPI schema)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from raydistill.agent.trajectory import Trajectory


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SagParams(_Strict):
    """Self-consistent action generation for this request (METHOD.md §5); omit for plain greedy steps."""

    n: int = Field(8, ge=1, description="candidate actions per step (one engine request with n samples)")
    temperature: float = Field(0.4, ge=0, le=2)
    top_p: float = Field(0.8, gt=0, le=1)


class SolveRequest(_Strict):
    question: str = Field(..., min_length=1, description="the task, as the user would state it")
    domain: Literal["math", "qa"] = Field("qa", description="math asks for a \\boxed{} answer")
    sag: SagParams | None = None
    max_steps: int | None = Field(None, ge=1, description="default: the server's agent.max_steps")
    max_new_tokens: int | None = Field(None, ge=1, description="per step; default: agent.max_new_tokens")
    stream: bool = Field(False, description="server-sent events: one `step` event per step, then `result`")
    id: str | None = Field(None, max_length=200, description="client's id, echoed back")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("question is blank")
        return v


class SagStepSummary(BaseModel):
    step: int
    n: int
    survived: int
    """Candidates whose code parsed and ran without error."""
    groups: list[Any] = []
    """The vote: [size, key, logprob] per group of identical execution results, largest first."""
    chosen: Any = None


class SagSummary(BaseModel):
    n: int
    temperature: float
    top_p: float
    steps: list[SagStepSummary] = []
    survived_total: int = 0
    candidates_total: int = 0


class Timings(BaseModel):
    total_s: float
    """Wall time of the request on the server."""
    episode_s: float
    gen_s: float
    """Summed engine time over steps."""
    exec_s: float
    """Summed sandbox time over steps (sag candidates run in parallel, so this is wall time per step)."""
    num_steps: int


class SolveResponse(BaseModel):
    id: str
    final_answer: str | None
    max_steps_reached: bool
    error: str | None
    trajectory: Trajectory
    timings: Timings
    sag: SagSummary | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
    detail: str


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible chat completions (the subset the student engine can honour)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send fields we do not use (user, logit_bias, ...): tolerate them, do not reject.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    continue_final_message: bool = False
    """vLLM extension: continue the last assistant message instead of opening a new turn."""

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    finish_reason: str | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


def sag_summary(traj: Trajectory, params: SagParams | None) -> SagSummary | None:
    """Collect the per-step vote records the agent stored in `Step.sag`."""
    if params is None:
        return None
    out = SagSummary(n=params.n, temperature=params.temperature, top_p=params.top_p)
    for i, step in enumerate(traj.steps):
        if not step.sag:
            continue
        rec = json.loads(step.sag)
        s = SagStepSummary(step=i, n=int(rec.get("n", params.n)), survived=int(rec.get("survived", 0)),
                           groups=rec.get("groups", []), chosen=rec.get("chosen"))
        out.steps.append(s)
        out.survived_total += s.survived
        out.candidates_total += s.n
    return out


def timings(traj: Trajectory, total_s: float) -> Timings:
    return Timings(total_s=round(total_s, 4), episode_s=round(traj.duration_s, 4),
                   gen_s=round(sum(s.gen_s for s in traj.steps), 4),
                   exec_s=round(sum(s.exec_s for s in traj.steps), 4), num_steps=len(traj.steps))
