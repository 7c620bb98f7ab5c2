"""`raydistill solve --config CONFIG "question"`: one episode, locally (no Ray), printed for people or as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from raydistill.agent.trajectory import Trajectory

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the task to solve")
    p.add_argument("--role", choices=["student", "teacher"], default="student",
                   help="which engine and system prompt to use (default: student)")
    p.add_argument("--json", action="store_true", help="print the trajectory as one JSON object")
    p.add_argument("--sag", action="store_true", help="self-consistent action generation (cfg.agent.sag)")
    p.add_argument("--cot", action="store_true", help="plain chain-of-thought answer instead of the agent")
    p.add_argument("--domain", choices=["math", "qa"], default="math")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-tools", action="store_true", help="do not offer web_search even if retrieval is on")


def local_tools(cfg: Any) -> dict:
    """web_search over the run's index (`raydistill index` output) when retrieval is on and the index exists."""
    if not (cfg.retrieval.enabled and cfg.agent.web_search):
        return {}
    from raydistill.retrieval import Retriever, make_web_search, resolve_index_dir

    index_dir = resolve_index_dir(cfg)
    if not (index_dir / "meta.json").exists():
        print(f"note: no retrieval index at {index_dir} (run `raydistill index`); solving without web_search",
              file=sys.stderr)
        return {}
    retriever = Retriever.from_index_dir(index_dir, nprobe=cfg.retrieval.nprobe)
    return {"web_search": make_web_search(retriever, k=cfg.retrieval.top_k)}


async def solve(cfg: Any, question: str, *, role: str = "student", sag: bool = False, cot: bool = False,
                domain: str = "math", seed: int | None = None, tools: dict | None = None) -> Trajectory:
    from raydistill.agent.cot import run_cot
    from raydistill.agent.episode import run_episode
    from raydistill.engines import create_engine

    engine = create_engine(cfg.teacher if role == "teacher" else cfg.student)
    record = {"id": "cli", "question": question, "domain": domain, "source": "cli"}
    try:
        if cot:
            return await run_cot(engine, record, cfg.agent, role=role, seed=seed)
        from raydistill.sandbox import Sandbox

        tools = dict(tools or {})
        return await run_episode(engine, lambda: Sandbox(tools=tools, config=cfg.sandbox), record, cfg.agent,
                                 role=role, tools=tools, seed=seed, sag=sag or cfg.agent.sag.enabled)
    finally:
        await engine.aclose()


def format_trajectory(t: Trajectory) -> str:
    out = [f"Question: {t.question}", f"Engine: {t.engine}:{t.model}   role: {t.system_prompt}   kind: {t.kind}"]
    if t.ftp_prefix:
        out.append(f"First-thought prefix: {t.ftp_prefix.strip()}")
    for i, s in enumerate(t.steps, 1):
        flags = [f for f, on in (("parse error", s.parse_error), ("exec error", s.exec_error),
                                 ("final", s.is_final)) if on]
        out.append(f"\n--- step {i} ({s.completion_tokens} tokens, gen {s.gen_s:.2f}s, exec {s.exec_s:.2f}s)"
                   + (f" [{', '.join(flags)}]" if flags else ""))
        out.append(s.raw_text if s.raw_text.strip() else "(empty reply)")
        if s.sag:
            v = json.loads(s.sag)
            out.append(f"[sag: {v['survived']}/{v['n']} candidates survived, chosen #{v['chosen']}, "
                       f"groups {[g[0] for g in v['groups']]}]")
        if s.observation and not s.is_final:
            out.append(s.observation)
    out.append("")
    if t.max_steps_reached:
        out.append("Step limit reached" + (" (answer from the fallback request)" if t.fallback_answer else ""))
    if t.error:
        out.append(f"Error: {t.error}")
    out.append(f"Final answer: {t.final_answer}")
    out.append(f"Took {t.duration_s:.2f}s over {t.num_steps} step(s)")
    return "\n".join(out)


def main(cfg: Any, args: argparse.Namespace) -> int:
    tools = {} if args.no_tools or args.cot else local_tools(cfg)
    traj = asyncio.run(solve(cfg, args.question, role=args.role, sag=args.sag, cot=args.cot, domain=args.domain,
                             seed=args.seed, tools=tools))
    if args.json:
        json.dump(traj.to_row(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_trajectory(traj))
    return 0 if traj.error is None else 1
