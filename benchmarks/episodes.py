"""Agent episode throughput: our Episode loop vs a bare engine driver vs the paper-style loop, same run.

CPU (default): the transformers engine on the tiny random model; our loop at 1 and at 64 concurrent
episodes, and a bare driver (same episode shapes, no parsing/sandbox) at 64 - proves concurrency is real.

    python benchmarks/episodes.py                      # CPU, prints a table, --json-out for a file

GPU (`--gpu`): vLLM 0.26 AsyncLLM with random weights of a real shape (default Qwen2.5-0.5B, see
benchmarks/gpu/model_shapes.py), fixed token counts (ignore EOS):
  (a) ours:  run_episode over the vLLM engine, fixed-action mode (the parser gets a valid code action, so
             every step really runs in a sandbox: a web_search tool call with 10 ms latency whose output is
             padded to the observation size, state kept across steps, final_answer at the last step),
  (b) bare:  AsyncLLM.generate on token ids, same shapes, no chat template, parsing or sandbox (the ceiling),
  (c) paper: the same bare loop with only 4 episodes at a time (the reference's 4 workers).
Shapes: 5 steps, 1,500-token first prompt, 200 generated + 100 observation tokens per step, 10 ms tool.
The engine's start is not timed; the prefix cache is reset before each variant; all variants share one
engine and the same prompts' structure (a shared system prompt + a unique question per episode).

    PYTHONUNBUFFERED=1 python benchmarks/episodes.py --gpu --out $OUT      # see benchmarks/gpu/README.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Shape:
    steps: int = 5
    prompt_tokens: int = 1500
    """Tokens of the first prompt (system + task); the question is padded up to it."""
    gen_tokens: int = 200
    obs_tokens: int = 100
    tool_s: float = 0.01


# -- workload construction ----------------------------------------------------------------------------
def _count(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def _fill(tok, make, target: int) -> str:
    """Largest filler count k such that tokens(make(k)) <= target (make(k) grows with k)."""
    lo, hi = 0, max(1, target)
    while _count(tok, make(hi)) <= target and hi < 100_000:
        hi *= 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(tok, make(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return make(lo)


def make_questions(tok, role: str, tools: list[str], target: int, n: int) -> list[str]:
    """n distinct questions whose first prompt (system + task, chat-templated) is ~target tokens."""
    from raydistill.agent.messages import episode_prefix

    def make(k: int) -> str:
        q = "Episode 0: what is the answer?" + " word" * k
        return tok.apply_chat_template(episode_prefix(q, role, tools), tokenize=False, add_generation_prompt=True)

    text = _fill(tok, make, target)
    filler = text.split("New task:\n", 1)[1].split("\n\n", 1)[0].removeprefix("Episode 0: what is the answer?")
    return [f"Episode {i}: what is the answer?{filler}" for i in range(n)]


def make_tool_output(tok, target: int) -> str:
    """web_search output sized so the whole observation turn is ~target tokens."""
    from raydistill.agent.parsing import format_observation

    def make(k: int) -> str:
        return "<|im_start|>user\n" + format_observation("result" + " text" * k + "\n", None, 10**9) + "<|im_end|>\n"

    obs = _fill(tok, make, target)
    return obs.split("Execution logs:\n", 1)[1].rsplit("\n\nLast output", 1)[0]


# -- (a) our episode loop -----------------------------------------------------------------------------
async def run_ours(inner, shape: Shape, episodes: int, concurrency: int, role: str = "student",
                   sag_n: int = 1) -> dict:
    from raydistill.agent import run_episode
    from raydistill.config.agent import AgentConfig, SagConfig
    from raydistill.engines.fixed_action import FixedActionEngine, default_action

    tok = inner.tokenizer
    tool_text = make_tool_output(tok, shape.obs_tokens)

    async def web_search(query: str) -> str:
        await asyncio.sleep(shape.tool_s)
        return tool_text

    engine = FixedActionEngine(inner, default_action(shape.steps, tool="web_search"), gen_tokens=shape.gen_tokens)
    cfg = AgentConfig(max_steps=shape.steps, max_new_tokens=shape.gen_tokens, observation_max_chars=10**7,
                      sag=SagConfig(enabled=sag_n > 1, n=max(sag_n, 1)))
    questions = make_questions(tok, role, ["web_search"], shape.prompt_tokens, episodes)
    expected = str(sum(range(1, shape.steps)))
    sem = asyncio.Semaphore(concurrency)
    before = inner.stats().get("generated_tokens", 0)

    async def one(i: int):
        async with sem:
            rec = {"id": f"bench/{i}", "question": questions[i], "domain": "math", "source": "bench"}
            return await run_episode(engine, None, rec, cfg, role=role, tools={"web_search": web_search})

    t0 = time.perf_counter()
    trajs = await asyncio.gather(*(one(i) for i in range(episodes)))
    wall = time.perf_counter() - t0
    gen = inner.stats().get("generated_tokens", 0) - before
    ok = sum(1 for t in trajs if t.error is None and t.final_answer == expected)
    steps = [s for t in trajs for s in t.steps]
    first = [t.steps[0].prompt_tokens for t in trajs if t.steps]
    return dict(variant="ours", episodes=episodes, concurrency=concurrency, wall_s=round(wall, 3),
                episodes_per_s=round(episodes / wall, 3), gen_tokens=gen, tok_s=round(gen / wall, 1),
                ok_episodes=ok, steps=len(steps), exec_errors=sum(s.exec_error for s in steps),
                parse_errors=sum(s.parse_error for s in steps), first_prompt_tokens=round(sum(first) / max(1, len(first))),
                mean_exec_ms=round(1000 * sum(s.exec_s for s in steps) / max(1, len(steps)), 2),
                errors=sorted({t.error for t in trajs if t.error})[:3], sag_n=sag_n)


# -- (b)/(c) the bare driver ----------------------------------------------------------------------------
async def run_bare(inner, shape: Shape, episodes: int, concurrency: int, role: str = "student",
                   name: str = "bare", detokenize: bool = False, reuse_generated: bool = True) -> dict:
    """Same shapes as `run_ours` straight on the engine: token-id prompts, random observation tokens.

    reuse_generated=False appends fresh random ids in place of the generated ones, as a fixed-action
    transcript does (its assistant text is not what was generated): those blocks then miss the prefix cache
    and are prefilled again, the GPU-side cost the fixed-action stage pays and the plain bare driver does not.
    """
    from raydistill.agent.messages import episode_prefix

    tok = inner.tokenizer
    rnd = random.Random(0)
    vocab = min(len(tok), 150_000)
    prompts = []
    for q in make_questions(tok, role, ["web_search"], shape.prompt_tokens, episodes):
        text = tok.apply_chat_template(episode_prefix(q, role, ["web_search"]), tokenize=False,
                                       add_generation_prompt=True)
        prompts.append(list(tok.encode(text, add_special_tokens=False)))
    gen_fn = _bare_generate_fn(inner, shape.gen_tokens, detokenize)
    sem = asyncio.Semaphore(concurrency)
    counted = [0]

    async def episode(ids: list[int]) -> None:
        async with sem:
            for _ in range(shape.steps):
                out = await gen_fn(ids)
                counted[0] += len(out)
                await asyncio.sleep(shape.tool_s)
                said = out if reuse_generated else [rnd.randrange(1000, vocab) for _ in out]
                ids = ids + said + [rnd.randrange(1000, vocab) for _ in range(shape.obs_tokens)]

    t0 = time.perf_counter()
    await asyncio.gather(*(episode(p) for p in prompts))
    wall = time.perf_counter() - t0
    return dict(variant=name, episodes=episodes, concurrency=concurrency, wall_s=round(wall, 3),
                episodes_per_s=round(episodes / wall, 3), gen_tokens=counted[0], tok_s=round(counted[0] / wall, 1),
                first_prompt_tokens=round(sum(map(len, prompts)) / len(prompts)))


def _bare_generate_fn(inner, gen_tokens: int, detokenize: bool):
    if getattr(inner, "backend", "") == "vllm":
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = VSamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True, detokenize=detokenize,
                             output_kind=RequestOutputKind.FINAL_ONLY)

        async def gen(ids: list[int]) -> list[int]:
            final = None
            async for o in inner.llm.generate({"prompt_token_ids": ids}, sp, uuid.uuid4().hex):
                final = o
            return list(final.outputs[0].token_ids)

        return gen

    from raydistill.engines import ChatRequest, SamplingParams

    params = SamplingParams(max_tokens=gen_tokens, ignore_eos=True)

    async def gen_generic(ids: list[int]) -> list[int]:
        [c] = await inner.generate(ChatRequest(prompt_token_ids=ids), params)
        return c.token_ids

    return gen_generic


# -- drivers -------------------------------------------------------------------------------------------
async def warm_up(inner, n: int = 8, tokens: int = 8) -> None:
    from raydistill.engines import ChatRequest, SamplingParams
    from raydistill.sandbox import Sandbox

    p = SamplingParams(max_tokens=tokens, ignore_eos=True)
    await asyncio.gather(*(inner.generate(ChatRequest(prompt_token_ids=[100 + i] * 64), p) for i in range(n)))
    sb = Sandbox()  # the first sandbox of a process starts the sandbox machinery: keep that out of the timings
    await sb.arun("import numpy, sympy")
    await sb.aclose()


def _print(r: dict) -> None:
    print(f"  {r['variant']:>6} conc={r['concurrency']:<4} episodes={r['episodes']:<5} {r['wall_s']:>8.2f}s "
          f"{r['episodes_per_s']:>8.2f} ep/s {r['tok_s']:>10.1f} tok/s"
          + (f"  ok={r['ok_episodes']}/{r['episodes']}" if "ok_episodes" in r else ""), flush=True)


async def cpu_main(args) -> dict:
    from raydistill.config.engine import EngineConfig
    from raydistill.engines import create_engine

    shape = Shape(steps=args.steps or 3, prompt_tokens=args.prompt_tokens or 400, gen_tokens=args.gen_tokens or 16,
                  obs_tokens=args.obs_tokens or 24, tool_s=0.01)
    t = time.perf_counter()
    inner = create_engine(EngineConfig(model=args.model or "tiny:qwen2-tiny", max_batch_size=64, max_model_len=4096,
                                       cpu_threads=args.cpu_threads))
    start_s = time.perf_counter() - t
    await warm_up(inner)
    res = {"mode": "cpu", "shape": asdict(shape), "engine_start_s": round(start_s, 1), "runs": []}
    print(f"CPU, transformers engine ({inner.model_name}), shape {asdict(shape)}", flush=True)
    for conc, n in ((1, args.episodes_single), (64, args.episodes)):
        seen = len(inner.batch_sizes)
        r = await run_ours(inner, shape, n, conc)
        sizes = inner.batch_sizes[seen:]
        r["mean_batch"] = round(sum(sizes) / max(1, len(sizes)), 2)
        res["runs"].append(r)
        _print(r)
    r = await run_bare(inner, shape, args.episodes, 64)
    res["runs"].append(r)
    _print(r)
    a1, a64, b64 = res["runs"]
    res["speedup_64_vs_1"] = round(a64["tok_s"] / a1["tok_s"], 2)
    res["ours_vs_bare_64"] = round(a64["tok_s"] / b64["tok_s"], 3)
    print(f"  concurrency speed-up (64 vs 1): {res['speedup_64_vs_1']}x tokens/s; ours/bare at 64: "
          f"{res['ours_vs_bare_64']}", flush=True)
    await inner.aclose()
    return res


async def gpu_main(args) -> dict:
    import torch

    from benchmarks.gpu.model_shapes import make_model_dir
    from raydistill.config.engine import EngineConfig
    from raydistill.engines import create_engine

    shape = Shape(steps=args.steps or 5, prompt_tokens=args.prompt_tokens or 1500, gen_tokens=args.gen_tokens or 200,
                  obs_tokens=args.obs_tokens or 100, tool_s=0.01)
    model_dir = make_model_dir(args.shape, args.model_dir or f"/tmp/raydistill-bench/{args.shape}")
    cfg = EngineConfig(backend="vllm", model=str(model_dir), load_format="dummy", dtype="bfloat16",
                       max_model_len=8192, gpu_memory_utilization=args.gpu_memory_utilization,
                       max_num_seqs=args.max_num_seqs, enable_prefix_caching=True,
                       engine_kwargs={"skip_tokenizer_init": True} if args.skip_tokenizer_init else {})
    t = time.perf_counter()
    inner = create_engine(cfg)
    start_s = time.perf_counter() - t
    print(f"engine up in {start_s:.1f}s (not timed below)", flush=True)
    await warm_up(inner, n=32, tokens=16)
    res = {"mode": "gpu", "device": torch.cuda.get_device_name(0), "shape": asdict(shape), "model": args.shape,
           "engine_start_s": round(start_s, 1), "max_num_seqs": args.max_num_seqs, "runs": []}
    plan = [("bare", args.episodes, args.concurrency), ("ours", args.episodes, args.concurrency),
            ("paper", args.paper_episodes, 4)]
    if args.order == "ours-first":
        plan = [plan[1], plan[0], plan[2]]
    for name, n, conc in plan:
        await inner.reset_prefix_cache()
        if name == "ours":
            r = await run_ours(inner, shape, n, conc, sag_n=1)
        else:
            r = await run_bare(inner, shape, n, conc, name=name, detokenize=args.bare_detokenize)
        res["runs"].append(r)
        _print(r)
    if args.sag:
        await inner.reset_prefix_cache()
        r = await run_ours(inner, shape, args.sag_episodes, args.concurrency, sag_n=args.sag)
        r["variant"] = f"ours_sag{args.sag}"
        res["runs"].append(r)
        _print(r)
    by = {r["variant"]: r for r in res["runs"]}
    res["ours_vs_bare"] = round(by["ours"]["tok_s"] / by["bare"]["tok_s"], 3)
    res["ours_vs_paper"] = round(by["ours"]["tok_s"] / by["paper"]["tok_s"], 2)
    res["targets"] = {"ours_vs_bare": ">= 0.9", "ours_vs_paper": ">= 5"}
    print(f"ours/bare = {res['ours_vs_bare']} (target >= 0.9); ours/paper = {res['ours_vs_paper']} (target >= 5)",
          flush=True)
    try:
        from raydistill.sandbox import Sandbox

        with Sandbox() as sb:
            res["sandbox_isolation"] = sb.isolation_level
    except Exception as e:  # report, don't fail the benchmark
        res["sandbox_isolation"] = f"unknown ({e})"
    await inner.aclose()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="vLLM on the GPU: (a) ours vs (b) bare vs (c) paper-style")
    p.add_argument("--episodes", type=int, default=None, help="episodes per variant (CPU 64, GPU 1024)")
    p.add_argument("--episodes-single", type=int, default=6, help="CPU: episodes at concurrency 1")
    p.add_argument("--concurrency", type=int, default=256, help="GPU: concurrent episodes for (a) and (b)")
    p.add_argument("--paper-episodes", type=int, default=64, help="GPU: episodes for (c), 4 at a time")
    p.add_argument("--steps", type=int), p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--gen-tokens", type=int), p.add_argument("--obs-tokens", type=int)
    p.add_argument("--model", default=None, help="CPU: model (default tiny:qwen2-tiny)")
    p.add_argument("--cpu-threads", type=int, default=1, help="CPU: torch threads for the engine")
    p.add_argument("--shape", default="qwen2.5-0.5b", help="GPU: model shape (benchmarks/gpu/model_shapes.py)")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--bare-detokenize", action="store_true", help="GPU: detokenize in (b)/(c) too")
    p.add_argument("--skip-tokenizer-init", action="store_true",
                   help="GPU: vLLM without its tokenizer (no detokenising; fixed-action mode needs no text)")
    p.add_argument("--order", choices=["bare-first", "ours-first"], default="bare-first")
    p.add_argument("--sag", type=int, default=0, help="GPU: also run ours with sag N candidates per step")
    p.add_argument("--sag-episodes", type=int, default=256)
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON result (default $OUT)")
    p.add_argument("--json-out", default=None, help="file for the JSON result")
    args = p.parse_args(argv)
    if args.episodes is None:
        args.episodes = 1024 if args.gpu else 64
    res = asyncio.run(gpu_main(args) if args.gpu else cpu_main(args))
    res["python"] = platform.python_version()
    res["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    text = json.dumps(res, indent=1)
    out = args.json_out or (os.path.join(args.out, f"episodes_{res['mode']}.json") if args.out else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}", flush=True)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
