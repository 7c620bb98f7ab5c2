"""The agent: prompts, parsing, the episode loop (with ftp and sag), CoT mode, trajectory schema.

    traj = await run_episode(engine, sandbox, record, cfg.agent, role="teacher", tools={"web_search": fn})
    traj = await run_cot(engine, record, cfg.agent, passages=None)
    chat = trajectory_to_chat(traj, system_prompt="student")     # for SFT
"""

from raydistill.agent.cot import run_cot
from raydistill.agent.episode import Episode, run_episode
from raydistill.agent.messages import cot_to_chat, trajectory_to_chat
from raydistill.agent.trajectory import Step, Trajectory, from_table, to_table

__all__ = [
    "Episode",
    "Step",
    "Trajectory",
    "cot_to_chat",
    "from_table",
    "run_cot",
    "run_episode",
    "to_table",
    "trajectory_to_chat",
]
