"""The whole generate stage (Ray Data + teacher actor + sandbox actors) vs a bare AsyncLLM driver vs the
paper-style loop (4 episodes at a time), same episode shapes, one run, JSON to $OUT.

GPU (default): vLLM 0.26 with random weights of a real shape (default Qwen2.5-0.5B, load_format=dummy), the
agent-core benchmark's fixed-action mode (benchmarks/episodes.py: each step generates exactly `gen_tokens`
tokens, then the parser gets a valid code action, so every step really runs in a pooled sandbox; the
`web_search` tool sleeps 10 ms and returns text padded to `obs_tokens`), 5 steps, ~1,500-token first prompt
(the teacher prompt + a padded question), 200 generated + 100 observation tokens per step.

  stage: raydistill.stages.generate.generate_trajectories over >= 1,024 questions (Ray Data map_batches over
         one teacher actor holding the vLLM engine; sandboxes in SandboxPool actors; shards written by the
         actor). Timed from the first episode's start (engine start excluded) to the driver receiving the
         last batch (shard writes included). Filter + SFT build timed separately.
  bare:  benchmarks.episodes.run_bare straight on the same AsyncLLM, same prompts/shapes, 256 at a time.
  paper: the same bare loop, 4 episodes at a time (the reference's 4 workers).
One engine serves all three (as in benchmarks/episodes.py): the teacher actor runs bare and paper first,
inside its own event loop, before its first episode (so one ~150 s engine start fits the 10-minute device
call); the stage's window starts at its first episode. The prefix cache is reset before each variant.

    PYTHONUNBUFFERED=1 python benchmarks/gpu/generate_gpu.py --out $OUT          # GPU (device machine)
    python benchmarks/gpu/generate_gpu.py --cpu --out /tmp/x                      # tiny CPU run of the same code
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)

from raydistill.actors.teacher import TeacherWorker  # noqa: E402


class FakeWebSearch:
    """Picklable `web_search`: fixed latency, fixed output size (runs in the sandbox host actor)."""

    def __init__(self, text: str, latency_s: float) -> None:
        self.text, self.latency_s = text, latency_s

    async def __call__(self, query: str) -> str:
        await asyncio.sleep(self.latency_s)
        return self.text


class BenchTeacher(TeacherWorker):
    """TeacherWorker whose engine is wrapped in fixed-action mode; logs each episode's wall-clock span, and
    runs the bare/paper baselines on its engine before its first episode."""

    def __init__(self, *args, bench_steps: int, bench_gen_tokens: int, times_dir: str,
                 baselines: dict | None = None, **kwargs) -> None:
        self.bench_steps, self.bench_gen_tokens = bench_steps, bench_gen_tokens
        self.baselines = baselines
        self._baseline_lock: asyncio.Lock | None = None
        self._baselines_done = False
        self.times_path = Path(times_dir) / f"{os.getpid()}-{time.time_ns()}.jsonl"
        self.times_path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(*args, **kwargs)
        with self.times_path.open("a") as f:
            f.write(json.dumps({"engine_ready": time.time()}) + "\n")

    def _create_engine(self, create_engine):
        from raydistill.engines.fixed_action import FixedActionEngine, default_action

        inner = create_engine(self.cfg.teacher)
        return FixedActionEngine(inner, default_action(self.bench_steps, tool="web_search"),
                                 gen_tokens=self.bench_gen_tokens)

    async def _run_baselines(self) -> None:
        from benchmarks.episodes import Shape, run_bare
        from raydistill.engines import ChatRequest, SamplingParams

        b = self.baselines
        inner = self.engine.inner
        shape = Shape(**b["shape"])
        warm = SamplingParams(max_tokens=8, ignore_eos=True)  # first requests (graphs, allocator) untimed
        await asyncio.gather(*(inner.generate(ChatRequest(prompt_token_ids=[100 + i] * 64), warm) for i in range(8)))
        runs = []
        for name, n, conc in (("bare", b["episodes"], b["concurrency"]), ("paper", b["paper_episodes"], 4)):
            await inner.reset_prefix_cache()
            runs.append(await run_bare(inner, shape, n, conc, role="teacher", name=name))
        await inner.reset_prefix_cache()
        Path(b["out"]).write_text(json.dumps(runs))

    async def __call__(self, batch):
        if self.baselines is not None and not self._baselines_done:
            if self._baseline_lock is None:
                self._baseline_lock = asyncio.Lock()
            async with self._baseline_lock:
                if not self._baselines_done:
                    await self._run_baselines()
                    self._baselines_done = True
        return await super().__call__(batch)

    async def run_one(self, row):
        t0 = time.time()
        traj = await super().run_one(row)
        with self.times_path.open("a") as f:
            f.write(json.dumps({"start": t0, "end": time.time()}) + "\n")
        return traj


def build_config(args, model_dir: str, run_dir: Path, cpu: bool):
    from raydistill.config import RootConfig

    teacher = (dict(backend="transformers", model=model_dir, max_model_len=4096, max_batch_size=args.concurrency)
               if cpu else
               dict(backend="vllm", model=model_dir, load_format="dummy", dtype="bfloat16", max_model_len=8192,
                    gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                    enable_prefix_caching=True, num_gpus=1))
    return RootConfig.model_validate({
        "run_dir": str(run_dir),
        "ray": {"address": "local"},
        "teacher": teacher,
        "student": {"model": model_dir},
        "agent": {"max_steps": args.steps, "max_new_tokens": args.gen_tokens, "temperature": 0.0, "ftp": False,
                  "observation_max_chars": 10**7},
        "retrieval": {"enabled": True},
        "sandbox": {"pool": {"num_actors": args.sandbox_actors, "num_cpus_per_actor": 0.25}},
        "generate": {"kinds": ["agent"], "num_workers": 1, "episodes_per_worker": args.concurrency,
                     "batch_size": args.batch_size, "shard_rows": 256, "flush_interval_s": 30,
                     "worker_num_cpus": 1, "progress_interval_s": 10},
        "sft": {"max_length": 16384},
    })


def run_stage(args, cfg, model_dir: str, shape, tok) -> dict:
    import ray

    from benchmarks.episodes import make_questions, make_tool_output
    from raydistill.actors.sandbox_pool import SandboxPool
    from raydistill.curation import TrajectoryStore
    from raydistill.stages import generate
    from raydistill.stages.ray_init import init_ray

    expected = str(sum(range(1, shape.steps)))  # default_action's final answer
    tool_text = make_tool_output(tok, shape.obs_tokens)
    questions = make_questions(tok, "teacher", ["web_search"], shape.prompt_tokens, args.episodes)
    rows = [{"id": f"bench/{i}", "sample": 0, "question": q, "gold": [expected], "domain": "math",
             "source": "bench"} for i, q in enumerate(questions)]
    init_ray(cfg.ray)
    pool = SandboxPool(cfg.sandbox)
    for _ in range(args.sandbox_actors):  # zygotes up (numpy/sympy imported) before timing
        pool.create_sync().close()
    tools = SimpleNamespace(sandbox_pool=pool, web_search=FakeWebSearch(tool_text, shape.tool_s), close=lambda: None)
    times_dir = cfg.run_path / "bench_times"
    baselines_out = cfg.run_path / "baselines.json"
    baselines = {"episodes": args.episodes, "paper_episodes": args.paper_episodes, "concurrency": args.concurrency,
                 "shape": asdict(shape), "out": str(baselines_out)}
    t_call = time.time()
    gen = generate.generate_trajectories(
        cfg, "agent", rows, worker_cls=BenchTeacher, tools=tools,
        worker_kwargs={"bench_steps": shape.steps, "bench_gen_tokens": shape.gen_tokens, "times_dir": str(times_dir),
                       "baselines": baselines})
    t_done = time.time()
    events = [json.loads(x) for p in times_dir.glob("*.jsonl") for x in p.read_text().splitlines()]
    starts = [e["start"] for e in events if "start" in e]
    ends = [e["end"] for e in events if "end" in e]
    ready = [e["engine_ready"] for e in events if "engine_ready" in e]
    trajs, dups = TrajectoryStore(cfg.run_path / "trajectories" / "agent").read()
    gen_tokens = sum(s.completion_tokens for t in trajs for s in t.steps)
    steps = [s for t in trajs for s in t.steps]
    wall = t_done - min(starts)
    t_post = time.perf_counter()
    post = generate.filter_and_build(cfg, "agent", rows)
    post_s = time.perf_counter() - t_post
    pool.shutdown()
    ray.shutdown()
    baseline_runs = json.loads(baselines_out.read_text())
    return baseline_runs, dict(
        variant="stage", episodes=len(trajs), concurrency=args.concurrency, wall_s=round(wall, 3),
        episodes_per_s=round(len(trajs) / wall, 3), trajectories_per_s=round(len(trajs) / wall, 3),
        gen_tokens=gen_tokens, tok_s=round(gen_tokens / wall, 1),
        episode_span_s=round(max(ends) - min(starts), 3), tail_after_last_episode_s=round(t_done - max(ends), 3),
        startup_and_baselines_s_excluded=round(min(starts) - t_call, 1), engine_ready_s_after_call=round(min(ready) - t_call, 1)
        if ready else None, teacher_restarts=max(0, len(ready) - 1),
        ok_episodes=sum(1 for t in trajs if t.error is None and t.final_answer == expected),
        duplicate_rows=dups, steps=len(steps), exec_errors=sum(s.exec_error for s in steps),
        parse_errors=sum(s.parse_error for s in steps),
        mean_exec_ms=round(1000 * sum(s.exec_s for s in steps) / max(1, len(steps)), 2),
        first_prompt_tokens=round(sum(t.steps[0].prompt_tokens for t in trajs if t.steps) / max(1, len(trajs))),
        errors=sorted({t.error for t in trajs if t.error})[:3],
        filter_sft_s=round(post_s, 2), passed=post["report"]["passed"], sft_examples=post["sft"]["count"],
        sft_mean_tokens=post["sft"]["stats"]["mean_tokens"], generation_summary=gen,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny CPU run (transformers engine, tiny model)")
    p.add_argument("--episodes", type=int, default=None, help="questions for stage and bare (GPU 1024, CPU 24)")
    p.add_argument("--paper-episodes", type=int, default=None, help="episodes of the 4-at-a-time loop")
    p.add_argument("--concurrency", type=int, default=None, help="episodes in flight (GPU 256, CPU 8)")
    p.add_argument("--batch-size", type=int, default=None, help="Ray Data batch (GPU 64, CPU 4)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--gen-tokens", type=int, default=None)
    p.add_argument("--obs-tokens", type=int, default=None)
    p.add_argument("--sandbox-actors", type=int, default=None)
    p.add_argument("--shape", default="qwen2.5-0.5b", help="GPU model shape (benchmarks/gpu/model_shapes.py)")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--run-dir", default="/tmp/raydistill-bench/generate-run")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for generate_gpu.json (default $OUT)")
    args = p.parse_args(argv)
    cpu = args.cpu
    d = dict(episodes=24, paper_episodes=8, concurrency=8, batch_size=4, steps=3, prompt_tokens=400, gen_tokens=16,
             obs_tokens=24, sandbox_actors=1) if cpu else \
        dict(episodes=1024, paper_episodes=64, concurrency=256, batch_size=64, steps=5, prompt_tokens=1500,
             gen_tokens=200, obs_tokens=100, sandbox_actors=4)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    from transformers import AutoTokenizer

    from benchmarks.episodes import Shape

    shape = Shape(steps=args.steps, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                  obs_tokens=args.obs_tokens, tool_s=0.01)
    if cpu:
        from raydistill.models import resolve_model

        model_dir = resolve_model("tiny:qwen2-tiny")
    else:
        from benchmarks.gpu.model_shapes import make_model_dir

        model_dir = str(make_model_dir(args.shape, args.model_dir or f"/tmp/raydistill-bench/{args.shape}"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = build_config(args, model_dir, run_dir, cpu)
    res: dict = {"mode": "cpu" if cpu else "gpu", "shape": asdict(shape), "model": "tiny:qwen2-tiny" if cpu
                 else args.shape, "episodes": args.episodes, "concurrency": args.concurrency,
                 "batch_size": args.batch_size, "sandbox_actors": args.sandbox_actors, "runs": []}
    if not cpu:
        import torch

        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "?"
    print(f"stage: {args.episodes} questions, {args.concurrency} episodes in flight, shape {asdict(shape)}", flush=True)
    baseline_runs, stage = run_stage(args, cfg, model_dir, shape, tok)
    res["runs"] = [stage, *baseline_runs]
    for r in res["runs"]:
        print(f"  {r['variant']:>6} conc={r['concurrency']:<4} episodes={r['episodes']:<5} {r['wall_s']:>8.2f}s "
              f"{r['episodes_per_s']:>8.2f} ep/s {r['tok_s']:>10.1f} tok/s"
              + (f"  ok={r['ok_episodes']}/{r['episodes']}" if "ok_episodes" in r else ""), flush=True)
    by = {r["variant"]: r for r in res["runs"]}
    res["stage_vs_bare"] = round(by["stage"]["tok_s"] / by["bare"]["tok_s"], 3)
    res["stage_vs_paper"] = round(by["stage"]["tok_s"] / by["paper"]["tok_s"], 2)
    res["targets"] = {"stage_vs_bare": ">= 0.85", "stage_vs_paper": ">= 5"}
    res["python"] = platform.python_version()
    res["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"stage/bare = {res['stage_vs_bare']} (target >= 0.85); stage/paper = {res['stage_vs_paper']} "
          "(target >= 5)", flush=True)
    if args.out:
        out = Path(args.out) / f"generate_{res['mode']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}", flush=True)
    print("RESULT " + json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
