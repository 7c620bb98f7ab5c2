"""Generate-stage benchmarks on CPU: the SFT builder's speed, and (--stage) the whole stage on the tiny model.

1. SFT builder: N synthetic 5-step agent trajectories (~200-token steps, ~100-token observations) ->
   student chats -> input_ids + assistant-only loss mask, vs the floor of just tokenizing the same chats
   with `apply_chat_template(tokenize=True)` (no mask). Reports trajectories/s, tokens/s and the mask's cost.
2. --prompt-cost: CPU per agent step of turning the conversation into prompt ids on the teacher actor's
   event loop, whole-conversation encode vs IncrementalPromptEngine, on the GPU benchmark's exact
   conversation (Qwen2.5-0.5B-shaped tokenizer, fixed-action steps, 5 steps from a ~1,600-token prompt);
   process CPU time, so a busy machine inflates it less than wall time. Also checks the ids are identical.
3. --stage: benchmarks/gpu/generate_gpu.py --cpu (Ray Data stage vs bare driver vs 4-at-a-time loop on the
   tiny transformers model; plumbing figures, not the GPU targets).

    python benchmarks/generate.py [--n 300] [--prompt-cost] [--stage] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def synthetic_trajectories(n: int, steps: int = 5, words_per_step: int = 120, obs_words: int = 60) -> list:
    from raydistill.agent.trajectory import Step, Trajectory

    out = []
    for i in range(n):
        st = []
        for k in range(steps):
            body = " ".join(f"w{(i * 7 + k * 13 + j) % 997}" for j in range(words_per_step))
            code = "final_answer('42')" if k == steps - 1 else f"x{k} = web_search('q {i} {k}')\nprint(x{k})"
            st.append(Step(raw_text=f"Thought: {body}\n```py\n{code}\n```<end_code>", code=code,
                           observation="Observation:\nExecution logs:\n" + " ".join(["doc"] * obs_words),
                           is_final=k == steps - 1))
        out.append(Trajectory(id=f"bench/{i}", question=f"Question {i}?", gold=["42"], steps=st, final_answer="42",
                              tools=["web_search"]))
    return out


def bench_sft(n: int, tokenizer_name: str) -> dict:
    from raydistill.agent.messages import trajectory_to_chat
    from raydistill.sft import build_rows, load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    trajs = synthetic_trajectories(n)
    chats = [trajectory_to_chat(t, "student") for t in trajs]
    t0 = time.perf_counter()
    floor_tokens = sum(len(tok.apply_chat_template(c, tokenize=True)["input_ids"]) for c in chats)
    floor_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows, stats = build_rows(trajs, tok, max_length=10_240)
    build_s = time.perf_counter() - t0
    assert stats.tokens == floor_tokens, (stats.tokens, floor_tokens)
    return {"tokenizer": tokenizer_name, "trajectories": n, "mean_tokens": round(stats.tokens / n, 1),
            "loss_token_share": round(stats.loss_tokens / stats.tokens, 3),
            "build_s": round(build_s, 3), "trajectories_per_s": round(n / build_s, 1),
            "tokens_per_s": round(stats.tokens / build_s), "floor_tokenize_only_s": round(floor_s, 3),
            "mask_overhead_x": round(build_s / floor_s, 2)}


def bench_prompt_cost(episodes: int = 20, steps: int = 5) -> dict:
    import asyncio

    from transformers import AutoTokenizer

    from benchmarks.episodes import make_questions, make_tool_output
    from benchmarks.gpu.model_shapes import make_model_dir
    from raydistill.actors.teacher import IncrementalPromptEngine
    from raydistill.agent.messages import episode_prefix
    from raydistill.config.engine import EngineConfig
    from raydistill.engines.base import Completion, Engine
    from raydistill.engines.fixed_action import FixedActionEngine, default_action
    from raydistill.engines.rendering import render_prompt_ids

    tok = AutoTokenizer.from_pretrained(str(make_model_dir("qwen2.5-0.5b", "/tmp/raydistill-bench/qwen2.5-0.5b")))

    class Recorder(Engine):
        """Stands in for vLLM: renders the request to ids exactly as VLLMEngine does, generates nothing."""

        backend = "vllm"

        def __init__(self) -> None:
            super().__init__(EngineConfig(model="bench"))
            self.tokenizer, self.sent = tok, []

        async def generate(self, request, params):
            self.sent.append(render_prompt_ids(tok, request))
            return [Completion(text="", token_ids=list(range(1000, 1200)), completion_tokens=200)]

    qs = make_questions(tok, "teacher", ["web_search"], 1500, episodes)
    obs = "Observation:\n" + make_tool_output(tok, 100)

    async def run(engine) -> float:
        from raydistill.engines import SamplingParams
        from raydistill.engines.base import ChatRequest

        fa = FixedActionEngine(engine, default_action(steps), gen_tokens=200)
        t = time.process_time()
        for q in qs:
            msgs = episode_prefix(q, "teacher", ["web_search"])
            for _ in range(steps):
                [c] = await fa.generate(ChatRequest(messages=msgs), SamplingParams())
                msgs = [*msgs, {"role": "assistant", "content": c.text}, {"role": "user", "content": obs}]
        return (time.process_time() - t) / (episodes * steps)

    full, inc_inner = Recorder(), Recorder()
    inc = IncrementalPromptEngine(inc_inner)
    inc.alias_texts = None  # re-encode the fixed action like the full render does, so the ids can be compared
    full_s, inc_s = asyncio.run(run(full)), asyncio.run(run(inc))
    return {"steps": episodes * steps, "prompt_tokens_last_step": len(full.sent[steps - 1]),
            "full_ms_cpu_per_step": round(1000 * full_s, 3), "incremental_ms_cpu_per_step": round(1000 * inc_s, 3),
            "ids_identical": full.sent == inc_inner.sent,
            "prefix_kept_full_render": all(b[: len(a)] == a for a, b in zip(full.sent, full.sent[1:], strict=False)
                                           if len(b) > len(a)),
            "tokens_encoded_incremental": inc.counters["tokens_encoded"],
            "tokens_sent": sum(map(len, inc_inner.sent))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="synthetic trajectories for the SFT builder")
    p.add_argument("--tokenizer", default="tiny:qwen2-tiny")
    p.add_argument("--stage", action="store_true", help="also run the tiny CPU stage benchmark")
    p.add_argument("--prompt-cost", action="store_true", help="also measure prompt-ids CPU per step (full vs incremental)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    res: dict = {"python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    res["sft"] = bench_sft(args.n, args.tokenizer)
    s = res["sft"]
    print(f"SFT builder: {s['trajectories']} trajectories x {s['mean_tokens']} tokens: {s['build_s']}s "
          f"({s['trajectories_per_s']} traj/s, {s['tokens_per_s']} tok/s); tokenize-only floor "
          f"{s['floor_tokenize_only_s']}s -> mask costs {s['mask_overhead_x']}x", flush=True)
    if args.prompt_cost:
        res["prompt_cost"] = pc = bench_prompt_cost()
        print(f"prompt ids per step: full encode {pc['full_ms_cpu_per_step']} ms CPU, incremental "
              f"{pc['incremental_ms_cpu_per_step']} ms CPU (ids identical: {pc['ids_identical']}; encoded "
              f"{pc['tokens_encoded_incremental']} of {pc['tokens_sent']} tokens sent)", flush=True)
    if args.stage:
        import importlib.util

        spec = importlib.util.spec_from_file_location("generate_gpu", ROOT / "benchmarks/gpu/generate_gpu.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out_dir = Path("/tmp/raydistill-bench/generate-cpu")
        mod.main(["--cpu", "--out", str(out_dir)])
        res["stage"] = json.loads((out_dir / "generate_cpu.json").read_text())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    print("RESULT " + json.dumps(res["sft"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
