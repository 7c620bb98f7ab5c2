"""Trajectory -> chat messages: what SFT tokenizes and what the engine sees are built the same way."""

from __future__ import annotations

from raydistill.agent.prompts import Role, cot_prompt, system_prompt, task_prompt
from raydistill.agent.trajectory import Trajectory


def episode_prefix(question: str, role: Role, tools: list[str] | tuple[str, ...] = ()) -> list[dict[str, str]]:
    """System + first user turn of an agent episode."""
    return [
        {"role": "system", "content": system_prompt(role, list(tools))},
        {"role": "user", "content": task_prompt(question)},
    ]


def trajectory_to_chat(traj: Trajectory, system_prompt: Role = "student") -> list[dict[str, str]]:
    """One chat for SFT: system (`system_prompt` role's text, same tools as offered), user task, then
    alternating assistant (raw step text, ftp prefix included) and user (observation) turns, ending with the
    assistant's last step. Observations are the exact strings the model saw.
    """
    if traj.kind != "agent":
        return cot_to_chat(traj)
    msgs = episode_prefix(traj.question, system_prompt, traj.tools)
    for i, step in enumerate(traj.steps):
        msgs.append({"role": "assistant", "content": step.raw_text})
        if i < len(traj.steps) - 1:
            msgs.append({"role": "user", "content": step.observation})
    return msgs


def cot_to_chat(traj: Trajectory, passages: list[str] | None = None) -> list[dict[str, str]]:
    """A CoT trajectory as system + user question + assistant reasoning (one turn)."""
    from raydistill.agent.prompts import COT_SYSTEM

    if not traj.steps:
        raise ValueError(f"trajectory {traj.id!r} has no steps to turn into a chat")
    return [
        {"role": "system", "content": COT_SYSTEM},
        {"role": "user", "content": cot_prompt(traj.question, passages)},
        {"role": "assistant", "content": traj.steps[-1].raw_text},
    ]
