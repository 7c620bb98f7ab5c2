"""sag on the GPU: step latency with N=8 candidates vs N=1, and the Serve endpoint's throughput under load.

Student: random weights of the Qwen2.5-1.5B shape (vLLM `load_format="dummy"`, benchmarks/gpu/model_shapes.py:
hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocab 151,936). Fixed-action mode
(raydistill.engines.fixed_action): the engine really generates `--gen-tokens` tokens per sample (ignore EOS),
then the episode gets a valid code action, so every candidate parses, executes in its own fork of the
episode's sandbox, and the candidates vote. The actions are built so the vote is real: per step, candidates
6 of every 8 compute the majority value, 1 a different value (its own vote group) and 1 raises (dropped);
the last step answers from the state the winners left (checked: the episode's answer must be the majority's).

Part 1 (`latency`, in-process): episodes one at a time (and at `--latency-concurrency` > 1), N=1 then N=8;
per-step latency = generation + execution/vote time of the step. Target: median N=8 / N=1 <= 1.5.
Part 2 (`serve`): the Ray Serve app (StudentEngine on the GPU with the fixed-action wrapper via
serve.engine_factory, SandboxPool, FastAPI ingress on 127.0.0.1), then POST /v1/solve at each
`--serve-concurrency`, without and with sag. Each part runs in its own process so the GPU is freed between.

    bash benchmarks/gpu/run.sh python3 benchmarks/gpu/sag_gpu.py            # GPU (see benchmarks/gpu/README.md)
    python benchmarks/gpu/sag_gpu.py --cpu                                  # tiny CPU mode (transformers)

Writes $OUT/sag_gpu.json (or --out DIR) and prints `RESULT {json}` last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEPS = int(os.environ.get("SAG_BENCH_STEPS", "3"))
"""Episode length of the fixed actions (the engine factory below runs in Serve replicas: env, not args)."""


def vote_action(max_steps: int):
    """(step, sample) -> code. Non-final steps: samples i % 8 in 0..5 agree, 6 disagrees, 7 raises."""

    def action(step: int, sample: int) -> str:
        if step >= max_steps - 1:
            return "final_answer(str(sum(v for k, v in sorted(globals().items()) if k.startswith('acc_'))))"
        if sample % 8 == 7:
            return f"acc_{step} = 1 // 0"
        value = step + 1 + (100 if sample % 8 == 6 else 0)
        return f"acc_{step} = {value}\nrows = [i * i for i in range(200)]\nprint('step', {step}, acc_{step}, sum(rows))"

    return action


def expected_answer(max_steps: int) -> str:
    return str(sum(range(1, max_steps)))


def fixed_action_engine(cfg: Any) -> Any:
    """serve.engine_factory target: the configured engine wrapped in fixed-action mode with the vote actions."""
    from raydistill.engines import create_engine
    from raydistill.engines.fixed_action import FixedActionEngine

    return FixedActionEngine(create_engine(cfg), vote_action(STEPS))


def engine_cfg(args: argparse.Namespace) -> Any:
    from raydistill.config.engine import EngineConfig

    if args.cpu:
        return EngineConfig(backend="transformers", model="tiny:qwen2-tiny", max_model_len=4096, max_batch_size=64)
    from benchmarks.gpu.model_shapes import make_model_dir

    model_dir = make_model_dir(args.shape, args.model_dir or f"/tmp/raydistill-bench/{args.shape}")
    return EngineConfig(backend="vllm", model=str(model_dir), load_format="dummy", dtype="bfloat16",
                        max_model_len=8192, gpu_memory_utilization=args.gpu_memory_utilization,
                        max_num_seqs=args.max_num_seqs, enable_prefix_caching=True, num_gpus=1, num_cpus=1)


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"n": 0, "median": None, "p90": None, "mean": None}
    s = sorted(xs)
    return {"n": len(s), "median": round(statistics.median(s), 4), "p90": round(s[int(0.9 * (len(s) - 1))], 4),
            "mean": round(statistics.fmean(s), 4)}


# ------------------------------------------------------------------------------------------------ part 1


async def latency_part(args: argparse.Namespace) -> dict:
    from benchmarks.episodes import make_questions, warm_up
    from raydistill.agent import run_episode
    from raydistill.config.agent import AgentConfig, SagConfig
    from raydistill.engines import create_engine
    from raydistill.engines.fixed_action import FixedActionEngine

    t0 = time.perf_counter()
    inner = create_engine(engine_cfg(args))
    start_s = time.perf_counter() - t0
    await warm_up(inner, n=16, tokens=16)
    engine = FixedActionEngine(inner, vote_action(args.steps), gen_tokens=args.gen_tokens)
    questions = make_questions(inner.tokenizer, "student", [], args.prompt_tokens, 4096)
    out: dict[str, Any] = {"engine_start_s": round(start_s, 1), "runs": []}
    qi = 0
    for conc in args.latency_concurrency:
        for n in (1, args.sag):
            await inner.reset_prefix_cache()
            cfg = AgentConfig(max_steps=args.steps, max_new_tokens=args.gen_tokens, observation_max_chars=10**6,
                              sag=SagConfig(enabled=n > 1, n=n, temperature=0.4, top_p=0.8))
            episodes = args.latency_episodes * conc

            async def one(i: int, cfg: AgentConfig = cfg) -> Any:
                rec = {"id": f"bench/{i}", "question": questions[i % len(questions)], "domain": "math"}
                return await run_episode(engine, None, rec, cfg, role="student", tools={})

            sem = asyncio.Semaphore(conc)

            async def guarded(i: int, one=one, sem=sem) -> Any:
                async with sem:
                    return await one(i)

            t = time.perf_counter()
            trajs = await asyncio.gather(*(guarded(qi + i) for i in range(episodes)))
            wall = time.perf_counter() - t
            qi += episodes
            steps = [s for tr in trajs for s in tr.steps]
            step_lat = [s.gen_s + s.exec_s for s in steps]
            nonfinal = [s for tr in trajs for s in tr.steps[:-1]]
            votes = [json.loads(s.sag) for s in nonfinal if s.sag]
            run = {
                "n": n, "concurrency": conc, "episodes": episodes, "wall_s": round(wall, 3),
                "episodes_per_s": round(episodes / wall, 3),
                "step_latency_s": _stats(step_lat), "gen_s": _stats([s.gen_s for s in steps]),
                "exec_s": _stats([s.exec_s for s in steps]),
                "ok_episodes": sum(1 for tr in trajs if tr.error is None and tr.final_answer == expected_answer(args.steps)),
                "errors": sorted({tr.error for tr in trajs if tr.error})[:3],
                "exec_error_steps": sum(s.exec_error for s in steps),
                "vote": {"steps": len(votes), "survived_mean": round(statistics.fmean(v["survived"] for v in votes), 3)
                         if votes else None,
                         "groups_mean": round(statistics.fmean(len(v["groups"]) for v in votes), 3) if votes else None},
            }
            out["runs"].append(run)
            print(f"  latency N={n:<2} conc={conc:<3} step median {run['step_latency_s']['median']}s "
                  f"(gen {run['gen_s']['median']}s, exec {run['exec_s']['median']}s) ok={run['ok_episodes']}/{episodes}"
                  f" vote={run['vote']}", flush=True)
    ratios = {}
    for conc in args.latency_concurrency:
        a = next(r for r in out["runs"] if r["n"] == 1 and r["concurrency"] == conc)
        b = next(r for r in out["runs"] if r["n"] == args.sag and r["concurrency"] == conc)
        ratios[str(conc)] = round(b["step_latency_s"]["median"] / a["step_latency_s"]["median"], 3)
    out["ratio_sag_vs_1_median_step"] = ratios
    out["target"] = "ratio at concurrency 1 <= 1.5"
    print(f"  N={args.sag} / N=1 median step latency: {ratios}", flush=True)
    await inner.aclose()
    return out


# ------------------------------------------------------------------------------------------------ part 2


def serve_part(args: argparse.Namespace) -> dict:
    from ray import serve

    from benchmarks.serve import load
    from raydistill.config import RootConfig
    from raydistill.stages import serve as serve_stage

    os.environ["SAG_BENCH_STEPS"] = str(args.steps)
    ecfg = engine_cfg(args)
    cfg = RootConfig.model_validate({
        "run_dir": "/tmp/raydistill-bench/serve-run",
        "ray": {"address": "local", "num_cpus": os.cpu_count(), "num_gpus": 0 if args.cpu else 1},
        "student": ecfg.model_dump(),
        "retrieval": {"enabled": False},
        "agent": {"max_steps": args.steps, "max_new_tokens": args.gen_tokens, "observation_max_chars": 10**6},
        "sandbox": {"pool": {"num_actors": 1 if args.cpu else 4, "num_cpus_per_actor": 0.2 if args.cpu else 1}},
        "serve": {"port": args.port, "engine_factory": "benchmarks.gpu.sag_gpu:fixed_action_engine",
                  "max_ongoing_requests": 1024, "engine_max_ongoing_requests": 4096, "max_steps_limit": args.steps,
                  "max_new_tokens_limit": max(4096, args.gen_tokens), "num_cpus": 0.2 if args.cpu else 1,
                  "request_timeout_s": 300, "min_replicas": 1 if args.cpu else 2, "max_replicas": 1 if args.cpu else 2},
    })
    from raydistill.stages.ray_init import init_ray

    init_ray(cfg.ray)
    t0 = time.perf_counter()
    summary = serve_stage.run(cfg)
    up_s = time.perf_counter() - t0
    url = summary["url"]
    print(f"  serve up at {url} in {up_s:.1f}s", flush=True)
    body = {"max_steps": args.steps, "max_new_tokens": args.gen_tokens}
    levels = []
    try:
        asyncio.run(load(url, concurrency=4, requests=8, body=body))  # warm-up: engine, sandboxes, forks
        for sag in (0, args.sag):
            b = {**body, **({"sag": {"n": sag}} if sag else {})}
            for conc in args.serve_concurrency:
                r = asyncio.run(load(url, concurrency=conc, requests=max(args.serve_requests, conc), body=b))
                r["sag_n"] = sag or 1
                levels.append(r)
                print(f"  serve sag={sag or 1:<2} conc={conc:<4} {r['requests_per_s']} req/s {r['steps_per_s']} steps/s "
                      f"p50 {r['latency_s']['p50']}s p95 {r['latency_s']['p95']}s errors={r['errors']}", flush=True)
    finally:
        serve.shutdown()
    return {"url": url, "startup_s": round(up_s, 1), "levels": levels}


# ------------------------------------------------------------------------------------------------ driver


def _child(part: str, argv: list[str], out_dir: Path) -> dict:
    path = out_dir / f"sag_gpu_{part}.json"
    cmd = [sys.executable, __file__, "--part", part, "--json-out", str(path), *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "SAG_BENCH_STEPS": str(_steps(argv))})
    if proc.returncode != 0 or not path.exists():
        return {"error": f"{part} part exited with {proc.returncode}"}
    return json.loads(path.read_text())


def _steps(argv: list[str]) -> int:
    return int(argv[argv.index("--steps") + 1]) if "--steps" in argv else STEPS


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny CPU mode (transformers, tiny random model)")
    p.add_argument("--part", choices=["latency", "serve"], help="run one part in this process (internal)")
    p.add_argument("--skip", choices=["latency", "serve"], action="append", default=[])
    p.add_argument("--shape", default="qwen2.5-1.5b")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--gen-tokens", type=int, default=None, help="tokens per sample per step (GPU 128, CPU 8)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="first prompt size (GPU 1024, CPU 200)")
    p.add_argument("--sag", type=int, default=8)
    p.add_argument("--latency-episodes", type=int, default=None, help="episodes per concurrency unit (GPU 8, CPU 2)")
    p.add_argument("--latency-concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--serve-concurrency", type=int, nargs="+", default=None, help="GPU 1 16 64, CPU 1 4")
    p.add_argument("--serve-requests", type=int, default=None, help="requests per level (GPU 128, CPU 8)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.7)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for sag_gpu.json (default $OUT)")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    gpu = not a.cpu
    a.gen_tokens = a.gen_tokens or (128 if gpu else 8)
    a.prompt_tokens = a.prompt_tokens or (1024 if gpu else 200)
    a.latency_episodes = a.latency_episodes or (8 if gpu else 2)
    a.serve_concurrency = a.serve_concurrency or ([1, 16, 64] if gpu else [1, 4])
    a.serve_requests = a.serve_requests or (128 if gpu else 8)
    if a.cpu and a.latency_concurrency == [1, 16]:
        a.latency_concurrency = [1, 4]
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.part:
        res = asyncio.run(latency_part(args)) if args.part == "latency" else serve_part(args)
        Path(args.json_out).write_text(json.dumps(res, indent=1))
        return 0
    out_dir = Path(args.out or "/tmp/raydistill-bench/out")
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"shape": "tiny:qwen2-tiny" if args.cpu else args.shape, "mode": "cpu" if args.cpu else "gpu",
                           "steps": args.steps, "gen_tokens": args.gen_tokens, "prompt_tokens": args.prompt_tokens,
                           "sag_n": args.sag, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not args.cpu:
        try:
            import torch

            res["device"] = torch.cuda.get_device_name(0)
        except Exception as e:
            res["device"] = f"unknown ({e})"
    for part in ("latency", "serve"):
        if part not in args.skip:
            print(f"== {part}", flush=True)
            res[part] = _child(part, argv, out_dir)
    text = json.dumps(res, indent=1)
    (out_dir / "sag_gpu.json").write_text(text)
    print(f"wrote {out_dir / 'sag_gpu.json'}", flush=True)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
