"""sag on the GPU: step latency with N=8 candidates vs N=1, and the Serve endpoint's throughput under load.

Student: random weights of the Qwen2.5-1.5B shape (vLLM `load_format="dummy"`, benchmarks/gpu/model_shapes.py:
hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocab 151,936). Fixed-action mode
(raydistill.engines.fixed_action): the engine really generates `--gen-tokens` tokens per sample (ignore EOS),
then the episode gets a valid code action, so every candidate parses, executes in its own fork of the
episode's sandbox, and the candidates vote. The actions are built so the vote is real: per step, candidates
6 of every 8 compute the majority value, 1 a different value (its own vote group) and 1 raises (dropped);
the last step answers from the state the winners left (checked: the episode's answer must be the majority's).

Part 1 (`latency`, in-process, no Serve): episodes one at a time (and at `--latency-concurrency` > 1), N=1 then
N=8; per-step latency = generation + execution/vote time of the step. Target: median N=8 / N=1 <= 1.5.
Part 2 (`serve`): a random peft LoRA adapter for the shape (r=8, all linear layers, made in its own process so
the GPU is free again), then the Ray Serve app on 127.0.0.1 (StudentEngine: vLLM WITH that adapter, wrapped in
fixed-action mode via serve.engine_factory; SandboxPool; FastAPI ingress), then
  checks: /healthz names the adapter and vLLM lists it as loaded after the requests below; /v1/chat/completions
    (OpenAI client shape, model `<shape>+lora`) and /v1/solve with sag N=8 answer through it (the solve's answer
    must be the vote majority's);
  load: closed-loop clients at each `--serve-concurrency` (default 32, 128), at each level sag N=8 (never
    measured before) then N=1, so a comparable pair comes first; each phase issues requests for `--phase-s` seconds and waits at most `--phase-grace-s`
    more for the ones in flight (then cancels them: counted `unfinished`); requests/s, steps/s, p50/p99.
  Every phase is skipped (and said so) when it would not fit into `--budget-s` (counted from the start of the
  run; engine start, ~150 s on the GPU with LoRA, is not part of any timing), and the JSON is rewritten after
  each phase, so the run cannot time out without results.
Each part runs in its own process so the GPU is freed between.

    bash benchmarks/gpu/run.sh python3 benchmarks/gpu/sag_gpu.py --skip latency   # GPU, ~5-6 min on one H200
    python benchmarks/gpu/sag_gpu.py --cpu                                          # tiny CPU mode (transformers)

Writes $OUT/sag_gpu.json (or --out DIR; parts also write sag_gpu_<part>.json) and prints `RESULT {json}` last.
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


def model_dir(args: argparse.Namespace) -> str:
    if args.cpu:
        from raydistill.models import resolve_model

        return str(resolve_model("tiny:qwen2-tiny"))
    from benchmarks.gpu.model_shapes import make_model_dir

    return str(make_model_dir(args.shape, args.model_dir or f"/tmp/raydistill-bench/{args.shape}"))


def engine_cfg(args: argparse.Namespace, adapter: str | None = None) -> Any:
    from raydistill.config.engine import EngineConfig

    lora = {"lora_adapter": adapter, "max_lora_rank": max(8, args.lora_rank)} if adapter else {}
    if args.cpu:
        return EngineConfig(backend="transformers", model="tiny:qwen2-tiny", max_model_len=4096, max_batch_size=64,
                            num_cpus=0.2, **lora)
    return EngineConfig(backend="vllm", model=model_dir(args), load_format="dummy", dtype="bfloat16",
                        max_model_len=8192, gpu_memory_utilization=args.gpu_memory_utilization,
                        max_num_seqs=args.max_num_seqs, enable_prefix_caching=True, enforce_eager=args.enforce_eager,
                        num_gpus=1, num_cpus=1, **lora)


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


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 4)


async def timed_load(url: str, *, concurrency: int, phase_s: float, grace_s: float, body: dict,
                     questions: list[str], expect: str, headers: dict | None = None) -> dict:
    """Closed loop: `concurrency` clients each POST /v1/solve back to back until `phase_s` has passed; requests
    still in flight then get at most `grace_s` more and are cancelled after that (the client disconnects, so
    Serve cancels their episodes). Throughput = finished requests / time until the last one finished."""
    import httpx

    lat: list[float] = []
    ends: list[float] = []
    steps = survived = candidates = wrong = 0
    errors: dict[str, int] = {}
    t0 = time.perf_counter()
    stop_at = t0 + phase_s
    counter = iter(range(10**9))

    async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=phase_s + grace_s + 60,
                                 limits=httpx.Limits(max_connections=concurrency,
                                                     max_keepalive_connections=concurrency)) as client:
        async def worker() -> None:
            nonlocal steps, survived, candidates, wrong
            while time.perf_counter() < stop_at:
                i = next(counter)
                payload = {"question": questions[i % len(questions)], "domain": "math", "id": f"load-{i}", **body}
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/solve", json=payload)
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    await asyncio.sleep(0.2)
                    continue
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    await asyncio.sleep(0.2)
                    continue
                end = time.perf_counter()
                data = r.json()
                lat.append(end - t)
                ends.append(end)
                steps += data["timings"]["num_steps"]
                wrong += data.get("final_answer") != expect
                if data.get("sag"):
                    survived += data["sag"]["survived_total"]
                    candidates += data["sag"]["candidates_total"]

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=phase_s + grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    ok = len(lat)
    wall = (max(ends) - t0) if ends else phase_s
    in_window = sum(1 for e in ends if e <= stop_at)
    return {"concurrency": concurrency, "phase_s": phase_s, "ok": ok, "unfinished": len(pending),
            "errors": errors, "wrong_answers": wrong, "wall_s": round(wall, 3),
            "requests_per_s": round(ok / wall, 3) if ok else 0.0,
            "steps_per_s": round(steps / wall, 3) if ok else 0.0,
            "window_requests_per_s": round(in_window / phase_s, 3),
            "avg_steps": round(steps / ok, 3) if ok else None,
            "latency_s": {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "max": _pct(lat, 1.0),
                          "mean": round(statistics.fmean(lat), 4) if lat else None},
            "sag_survived_per_step": round(survived / max(steps, 1), 3) if candidates else None,
            "sag_candidates": candidates}


def _wait_healthy(url: str, timeout_s: float) -> dict:
    import httpx

    deadline = time.perf_counter() + timeout_s
    last = None
    while time.perf_counter() < deadline:
        try:
            r = httpx.get(url + "/healthz", timeout=30)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(2)
    raise TimeoutError(f"/healthz not ready within {timeout_s:.0f}s (last: {last})")


def endpoint_checks(url: str, args: argparse.Namespace, model: str, adapter: str | None) -> dict:
    """The app answers through the adapter: OpenAI route, a sag solve, and what the engine says about the LoRA."""
    import httpx

    out: dict[str, Any] = {}

    def check(name: str, ok: bool, info: Any = None) -> None:
        out[name] = {"ok": bool(ok), "info": info}
        print(f"  check {name}: {'ok' if ok else 'FAILED'} {json.dumps(info, default=str)[:300]}", flush=True)

    models = httpx.get(url + "/v1/models", timeout=60).json()
    check("model_name", models["data"][0]["id"] == model, models["data"][0]["id"])
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 16, "n": 2,
        "temperature": 0.7, "seed": 1})
    body = r.json()
    check("chat_completions", r.status_code == 200 and len(body.get("choices", [])) == 2
          and body["usage"]["completion_tokens"] == 32, {"status": r.status_code, "model": body.get("model"),
                                                         "usage": body.get("usage"), "error": body.get("error")})
    r = httpx.post(url + "/v1/solve", timeout=300, json={
        "question": "What is the answer?", "domain": "math", "max_steps": args.steps,
        "max_new_tokens": args.gen_tokens, "sag": {"n": args.sag, "temperature": 0.4, "top_p": 0.8}})
    body = r.json()
    sag = body.get("sag") or {}
    check("solve_sag", r.status_code == 200 and body.get("final_answer") == expected_answer(args.steps)
          and len(body["trajectory"]["steps"]) == args.steps,
          {"status": r.status_code, "final_answer": body.get("final_answer"), "error": body.get("error"),
           "survived": [s["survived"] for s in sag.get("steps", [])], "timings": body.get("timings")})
    health = httpx.get(url + "/healthz", timeout=60).json()
    lora = health.get("lora") or {}
    if adapter is None:
        check("adapter", health.get("adapter") is None, health.get("adapter"))
    elif args.cpu:
        check("adapter", health.get("adapter") == adapter and lora.get("merged") is True, lora)
    else:  # vLLM: every request carries the LoRARequest; list_loras shows it loaded once requests ran through it
        check("adapter", health.get("adapter") == adapter and lora.get("id") in (lora.get("loaded_ids") or []), lora)
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def serve_part(args: argparse.Namespace, t_start: float, out: dict) -> dict:
    """Fills `out` as it goes (the caller saves it even when this raises)."""
    from ray import serve

    from benchmarks.episodes import make_questions
    from benchmarks.gpu.model_shapes import LORA_TARGETS
    from raydistill.config import RootConfig
    from raydistill.serving.student import model_label
    from raydistill.stages import serve as serve_stage
    from raydistill.stages.ray_init import init_ray

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    os.environ["SAG_BENCH_STEPS"] = str(args.steps)  # read by fixed_action_engine in the engine replica
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    out["levels"] = []
    adapter = None
    if not args.no_lora:
        t = time.perf_counter()
        adapter = str(Path(args.adapter_dir or f"/tmp/raydistill-bench/lora-r{args.lora_rank}-"
                                                f"{'tiny' if args.cpu else args.shape}"))
        code = (f"from benchmarks.gpu.model_shapes import make_adapter; make_adapter({model_dir(args)!r}, {adapter!r}, "
                f"{args.lora_rank}, {'cpu' if args.cpu else 'cuda'!r})")
        if not Path(adapter, "adapter_config.json").exists():  # own process: frees the GPU on exit
            subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
        out["adapter"] = {"path": adapter, "rank": args.lora_rank, "targets": LORA_TARGETS,
                          "make_s": round(time.perf_counter() - t, 1)}
        print(f"  adapter {adapter} ({out['adapter']['make_s']}s)", flush=True)
    ecfg = engine_cfg(args, adapter)
    cfg = RootConfig.model_validate({
        "run_dir": "/tmp/raydistill-bench/serve-run",
        "ray": {"address": "local", "num_cpus": os.cpu_count(), "num_gpus": 0 if args.cpu else 1},
        "student": ecfg.model_dump(),
        "retrieval": {"enabled": False},
        "agent": {"max_steps": args.steps, "max_new_tokens": args.gen_tokens, "observation_max_chars": 10**6},
        "sandbox": {"pool": {"num_actors": args.sandbox_actors, "num_cpus_per_actor": 0.2 if args.cpu else 1}},
        "serve": {"port": args.port, "host": "127.0.0.1", "adapter": adapter,
                  "engine_factory": "benchmarks.gpu.sag_gpu:fixed_action_engine",
                  "max_ongoing_requests": 1024, "engine_max_ongoing_requests": 8192, "max_steps_limit": args.steps,
                  "max_new_tokens_limit": max(4096, args.gen_tokens), "num_cpus": 0.2 if args.cpu else 1,
                  "request_timeout_s": 300, "min_replicas": args.ingress_replicas,
                  "max_replicas": args.ingress_replicas},
    })
    model = model_label(cfg.student, adapter)
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    try:
        summary = serve_stage.run(cfg)
        url = summary["url"]
        health = _wait_healthy(url, max(30.0, left() - 30))
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        out["url"], out["model"] = url, model
        out["healthz"] = {k: health.get(k) for k in ("engine", "adapter", "lora", "sandbox_hosts")}
        print(f"  serve up at {url} ({model}) in {out['startup_s']}s; {left():.0f}s of the budget left", flush=True)
        out["checks"] = endpoint_checks(url, args, model, adapter)
        _save(args, out)
        tok = _tokenizer(args)
        questions = make_questions(tok, "student", [], args.prompt_tokens, 512)
        out["prompt_tokens"] = args.prompt_tokens
        common = {"max_steps": args.steps, "max_new_tokens": args.gen_tokens}
        bodies = {n: {**common, **({"sag": {"n": n, "temperature": 0.4, "top_p": 0.8}} if n > 1 else {})}
                  for n in (args.sag, 1)}
        expect = expected_answer(args.steps)
        warm = asyncio.run(timed_load(url, concurrency=min(8, max(args.serve_concurrency)),
                                      phase_s=args.warmup_s, grace_s=args.phase_grace_s, body=bodies[args.sag],
                                      questions=questions, expect=expect))
        out["warmup"] = {k: warm[k] for k in ("ok", "errors", "unfinished", "wall_s")}
        for conc, n in [(c, n) for c in args.serve_concurrency for n in (args.sag, 1)]:  # pairs first
            need = args.phase_s + args.phase_grace_s + 5
            if left() < need:
                out["levels"].append({"sag_n": n, "concurrency": conc,
                                      "skipped": f"{left():.0f}s of the budget left, a phase needs {need:.0f}s"})
                print(f"  serve sag N={n} conc={conc}: skipped ({left():.0f}s left)", flush=True)
                continue
            r = asyncio.run(timed_load(url, concurrency=conc, phase_s=args.phase_s, grace_s=args.phase_grace_s,
                                       body=bodies[n], questions=questions, expect=expect))
            r["sag_n"] = n
            out["levels"].append(r)
            _save(args, out)
            print(f"  serve sag N={n:<2} conc={conc:<4} {r['requests_per_s']} req/s {r['steps_per_s']} steps/s "
                  f"p50 {r['latency_s']['p50']}s p99 {r['latency_s']['p99']}s ok={r['ok']} "
                  f"unfinished={r['unfinished']} wrong={r['wrong_answers']} errors={r['errors']}", flush=True)
        out["engine_stats"] = _wait_healthy(url, 60).get("engine_stats")
    finally:
        serve.shutdown()
    return out


def _tokenizer(args: argparse.Namespace) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(args))


def _save(args: argparse.Namespace, res: dict) -> None:
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1, default=str))


# ------------------------------------------------------------------------------------------------ driver


def _child(part: str, argv: list[str], out_dir: Path, timeout_s: float) -> dict:
    path = out_dir / f"sag_gpu_{part}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--part", part, "--json-out", str(path), *argv]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "SAG_BENCH_STEPS": str(_steps(argv))},
                              timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    res = json.loads(path.read_text()) if path.exists() else {}
    if rc != 0:
        res["exit"] = f"{part} part exited with {rc}" + (" (partial results kept)" if res else "")
    return res


def _steps(argv: list[str]) -> int:
    return int(argv[argv.index("--steps") + 1]) if "--steps" in argv else STEPS


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny CPU mode (transformers, tiny random model)")
    p.add_argument("--part", choices=["latency", "serve"], help="run one part in this process (internal)")
    p.add_argument("--skip", choices=["latency", "serve"], action="append", default=[],
                   help="skip a part (latency was measured already: --skip latency)")
    p.add_argument("--shape", default="qwen2.5-1.5b")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--gen-tokens", type=int, default=None, help="tokens per sample per step (GPU 128, CPU 8)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="first prompt size (GPU 1024, CPU 200)")
    p.add_argument("--sag", type=int, default=8)
    p.add_argument("--latency-episodes", type=int, default=None, help="episodes per concurrency unit (GPU 8, CPU 2)")
    p.add_argument("--latency-concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--serve-concurrency", type=int, nargs="+", default=None, help="GPU 32 128, CPU 2 4")
    p.add_argument("--phase-s", type=float, default=None, help="seconds each load phase issues requests "
                   "(GPU 15, CPU 6)")
    p.add_argument("--phase-grace-s", type=float, default=None, help="most seconds a phase waits for its "
                   "in-flight requests after that (GPU 15, CPU 60)")
    p.add_argument("--warmup-s", type=float, default=None, help="untimed warm-up load (GPU 8, CPU 2)")
    p.add_argument("--budget-s", type=float, default=None, help="the whole run's time budget; serve phases that "
                   "would not fit are skipped; the serve process is killed 20 s after it (GPU 340, CPU 900)")
    p.add_argument("--no-lora", action="store_true", help="serve the base model (no adapter)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--adapter-dir", default=None)
    p.add_argument("--sandbox-actors", type=int, default=None, help="sandbox host actors (GPU 6, CPU 1)")
    p.add_argument("--ingress-replicas", type=int, default=None, help="FastAPI ingress replicas (GPU 2, CPU 1)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs (faster start)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.7)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for sag_gpu.json (default $OUT)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--t-start", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    gpu = not a.cpu
    a.gen_tokens = a.gen_tokens or (128 if gpu else 8)
    a.prompt_tokens = a.prompt_tokens or (1024 if gpu else 200)
    a.latency_episodes = a.latency_episodes or (8 if gpu else 2)
    a.serve_concurrency = a.serve_concurrency or ([32, 128] if gpu else [2, 4])
    a.phase_s = a.phase_s or (15.0 if gpu else 6.0)
    a.phase_grace_s = a.phase_grace_s or (15.0 if gpu else 60.0)
    a.warmup_s = a.warmup_s or (8.0 if gpu else 2.0)
    a.budget_s = a.budget_s or (340.0 if gpu else 900.0)
    a.sandbox_actors = a.sandbox_actors or (6 if gpu else 1)
    a.ingress_replicas = a.ingress_replicas or (2 if gpu else 1)
    if a.cpu and a.latency_concurrency == [1, 16]:
        a.latency_concurrency = [1, 4]
    return a


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    wall_start = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.part:
        if args.part == "latency":
            res = asyncio.run(latency_part(args))
        else:  # the budget counts from the driver's start (passed as wall-clock time)
            t0 = t_start - (time.time() - args.t_start) if args.t_start else t_start
            res = {}
            try:
                res = serve_part(args, t0, res)
            except BaseException as e:  # keep what was measured, say what failed
                res["error"] = f"{type(e).__name__}: {e}"
                _save(args, res)
                raise
        _save(args, res)
        return 0
    out_dir = Path(args.out or "/tmp/raydistill-bench/out")
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"shape": "tiny:qwen2-tiny" if args.cpu else args.shape, "mode": "cpu" if args.cpu else "gpu",
                           "steps": args.steps, "gen_tokens": args.gen_tokens, "prompt_tokens": args.prompt_tokens,
                           "sag_n": args.sag, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": argv}
    if not args.cpu:
        try:
            import torch

            res["device"] = torch.cuda.get_device_name(0)
        except Exception as e:
            res["device"] = f"unknown ({e})"
    for part in ("latency", "serve"):
        if part not in args.skip:
            print(f"== {part}", flush=True)
            extra = ["--t-start", str(wall_start)] if part == "serve" else []
            limit = max(60.0, args.budget_s - (time.perf_counter() - t_start) + 20) if part == "serve" else 3600.0
            res[part] = _child(part, argv + extra, out_dir, limit)
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    res["cpu_s"] = _cpu_s()
    text = json.dumps(res, indent=1, default=str)
    (out_dir / "sag_gpu.json").write_text(text)
    print(f"wrote {out_dir / 'sag_gpu.json'}", flush=True)
    print("RESULT " + json.dumps(res, default=str), flush=True)
    return 0


def _cpu_s() -> dict:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"driver": round(me.ru_utime + me.ru_stime, 1), "children": round(kids.ru_utime + kids.ru_stime, 1)}


if __name__ == "__main__":
    sys.exit(main())
