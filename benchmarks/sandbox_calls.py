"""What a sandbox step costs the CALLER's event loop: pooled sandboxes (Ray actor calls to SandboxPool hosts)
vs sandboxes started inside the calling actor - the choice behind the teacher actor's loop share.

The teacher actor's one event loop also runs vLLM's output handler, so every millisecond of loop CPU per sandbox
step is taken from the engine. The GPU generate benchmark saw Ray's `submit_actor_task` at ~14% of that loop's
samples. This runs the same call pattern (create, K steps, close; C episodes at a time) from an async Ray actor,
in one run (modes in turn, `--rounds` times), and prints the loop thread's CPU per step (`time.thread_time` on the loop thread), process CPU per
step and wall per step. Figures are per process on this machine; compare the rows of one run. Every sandbox gets
a `web_search` tool (a closure over a Ray actor handle, as the teacher's):
  pool             SandboxPool.create(tools=...) and its handles: the mapping is shipped to each host once, then
                   named by key; Ray submissions are made on a helper thread (sandbox_pool.acall)
  pool_on_loop     the same calls submitted from the loop itself (`await actor.run.remote(...)`), as before
  pool_ship_tools  as pool_on_loop, with the tools pickled into every create call (the first path)
  in_actor         sandboxes started inside the calling actor

    python benchmarks/sandbox_calls.py                       # 64 episodes x 5 steps, 16 at a time
    python benchmarks/sandbox_calls.py --episodes 128 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("pool_ship_tools", "pool_on_loop", "pool", "in_actor")
CODE = "acc_{k} = {k} + 1\nprint(acc_{k} * 2)"


def make_caller():
    import ray

    @ray.remote(num_cpus=0.1)
    class Caller:
        """Stands in for the teacher actor: one event loop, many concurrent episodes."""

        def __init__(self, pool, tools: dict) -> None:
            self.pool = pool
            self.tools = tools

        async def measure(self, mode: str, episodes: int, steps: int, concurrency: int) -> dict:
            from raydistill.actors.sandbox_pool import SandboxHandle
            from raydistill.sandbox import Sandbox

            class OnLoop(SandboxHandle):
                """The previous path: each Ray call submitted from the loop itself."""

                async def arun(self, code: str):
                    return await self.actor.run.remote(self.sid, code)

                async def aclose(self) -> None:
                    await self.actor.close.remote(self.sid)

            async def create():
                if mode == "pool_on_loop":
                    i = self.pool._pick_index()
                    key, _ = await self.pool._register(i, self.tools)
                    sid, info = await self.pool.actors[i].create.remote(None, key)
                    return OnLoop(self.pool.actors[i], sid, info)
                if mode == "pool":
                    return await self.pool.create(tools=self.tools)
                if mode == "pool_ship_tools":
                    actor = self.pool._pick()  # the same round robin as create
                    sid, info = await actor.create.remote(dict(self.tools))
                    return OnLoop(actor, sid, info)
                sb = Sandbox(tools=self.tools)
                await sb.aready()
                return sb

            async def episode(sem: asyncio.Semaphore, out: list) -> None:
                async with sem:
                    sb = await create()
                    for k in range(steps):
                        r = await sb.arun(CODE.format(k=k))
                        out.append(r.stdout.strip() == str(2 * (k + 1)))
                    await sb.aclose()

            warm: list = []  # zygotes, imports, the first Ray calls: untimed
            await asyncio.gather(*(episode(asyncio.Semaphore(concurrency), warm) for _ in range(concurrency)))
            ok: list = []
            sem = asyncio.Semaphore(concurrency)
            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            await asyncio.gather(*(episode(sem, ok) for _ in range(episodes)))
            wall, loop_cpu, proc_cpu = (time.perf_counter() - t0, time.thread_time() - c0,
                                        time.process_time() - p0)
            n = episodes * steps
            return {"mode": mode, "episodes": episodes, "steps": n, "ok_steps": sum(ok), "wall_s": round(wall, 3),
                    "wall_ms_per_step": round(1e3 * wall / n, 3),
                    "loop_cpu_ms_per_step": round(1e3 * loop_cpu / n, 3),
                    "proc_cpu_ms_per_step": round(1e3 * proc_cpu / n, 3)}

    return Caller


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--pool-actors", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="every mode once per round, in turn; medians reported")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    a = ap.parse_args(argv)

    import ray

    from raydistill.actors.retriever import make_web_search_tool
    from raydistill.actors.sandbox_pool import SandboxPool
    from raydistill.config import RootConfig
    from raydistill.stages.ray_init import init_ray

    cfg = RootConfig.model_validate({"ray": {"address": "local"},
                                     "sandbox": {"pool": {"num_actors": a.pool_actors, "num_cpus_per_actor": 0.1}}})
    init_ray(cfg.ray)
    try:
        @ray.remote(num_cpus=0.05)
        class Retriever:
            async def web_search(self, query: str, k: int | None = None) -> str:
                return f"About {query}"

        pool = SandboxPool(cfg.sandbox)
        caller = make_caller().remote(pool, {"web_search": make_web_search_tool(Retriever.remote())})
        rows = [ray.get(caller.measure.remote(m, a.episodes, a.steps, a.concurrency))
                for _ in range(a.rounds) for m in MODES]
        pool.shutdown()
    finally:
        ray.shutdown()
    loop_ms = {m: statistics.median(r["loop_cpu_ms_per_step"] for r in rows if r["mode"] == m) for m in MODES}

    def ratio(x: str, y: str) -> float:
        return round(loop_ms[x] / max(1e-9, loop_ms[y]), 2)

    res = {"rows": rows, "median_loop_cpu_ms_per_step": loop_ms,
           "loop_cpu_pool_over_in_actor": ratio("pool", "in_actor"),
           "loop_cpu_on_loop_over_pool": ratio("pool_on_loop", "pool"),
           "loop_cpu_ship_tools_over_on_loop": ratio("pool_ship_tools", "pool_on_loop"),
           "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    for r in rows:
        print(f"  {r['mode']:>8}: {r['steps']} steps ({r['ok_steps']} right) wall {r['wall_ms_per_step']} ms/step, "
              f"loop-thread CPU {r['loop_cpu_ms_per_step']} ms/step, process CPU {r['proc_cpu_ms_per_step']} ms/step")
    print(f"loop CPU per step (medians of {a.rounds} rounds): pool / in-actor = {res['loop_cpu_pool_over_in_actor']}; "
          f"submitted on the loop / from the helper thread = {res['loop_cpu_on_loop_over_pool']}; tools shipped "
          f"every create / registered once (both on the loop) = {res['loop_cpu_ship_tools_over_on_loop']}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
