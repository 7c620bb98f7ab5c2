"""Chain-of-thought mode: one plain reasoning answer in <answer></answer> / \\boxed{} (no tools).

The CoT-distillation baseline (teacher CoT data, CoT students, evaluation) and, with retrieved passages
prepended, the RAG-CoT baseline. The ftp of agent episodes uses the same prompt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from raydistill.agent.parsing import extract_cot_answer
from raydistill.agent.prompts import COT_SYSTEM, cot_prompt
from raydistill.agent.trajectory import Step, Trajectory
from raydistill.config.agent import AgentConfig
from raydistill.engines.base import ChatRequest, Engine, PromptTooLongError, SamplingParams


def cot_messages(question: str, passages: Sequence[str] | None = None) -> list[dict[str, str]]:
    return [{"role": "system", "content": COT_SYSTEM}, {"role": "user", "content": cot_prompt(question, passages)}]


async def run_cot(
    engine: Engine,
    record: Any,
    cfg: AgentConfig | None = None,
    *,
    passages: Sequence[str] | None = None,
    role: str = "teacher",
    sample: int = 0,
    seed: int | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> Trajectory:
    """One CoT answer as a `Trajectory(kind="cot")` with a single final step (never raises for bad output).

    passages: retrieved texts to prepend (RAG-CoT). max_tokens defaults to cfg.max_new_tokens.
    """
    from raydistill.agent.episode import _question_fields

    cfg = cfg or AgentConfig()
    params = SamplingParams(n=1, temperature=cfg.temperature if temperature is None else temperature,
                            top_p=cfg.top_p, max_tokens=max_tokens or cfg.max_new_tokens, seed=seed)
    fields = _question_fields(record, sample)
    traj = Trajectory(**fields, kind="cot", engine=engine.backend, model=engine.model_name,
                      sampling=json.dumps({"cot": params.to_dict(), "passages": len(passages or [])}),
                      system_prompt="student" if role == "student" else "teacher")
    t0 = time.perf_counter()
    try:
        [c] = await engine.generate(ChatRequest(messages=cot_messages(traj.question, passages)), params)
        answer = extract_cot_answer(c.text)
        traj.steps.append(Step(raw_text=c.text, thought=c.text, is_final=True, prompt_tokens=c.prompt_tokens,
                               completion_tokens=c.completion_tokens, gen_s=round(time.perf_counter() - t0, 4)))
        traj.final_answer = answer
        if c.finish_reason == "length" and answer is None:
            traj.error = "cot answer cut off at max_tokens"
    except PromptTooLongError as e:
        traj.error = f"context window exceeded: {e}"
    except Exception as e:
        traj.error = f"{type(e).__name__}: {e}"
    traj.duration_s = round(time.perf_counter() - t0, 4)
    return traj
