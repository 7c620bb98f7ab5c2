"""GPU check of the vllm backend through the project's own code path (run with benchmarks/gpu/run.sh).

Random-weight Qwen2.5-0.5B shape (model_shapes.py) + a random LoRA adapter made with peft, one AsyncLLM:
chat generation with stop strings, n > 1 with log-probs and a seed, token-id prompts, continue_final_message,
prompt-too-long, reset_prefix_cache, LoRA by name, then real episodes (plain, sag N=4, ftp) with the sandbox.
Prints one JSON object (`RESULT {...}`), writes $OUT/vllm_smoke.json, exits 1 if a check failed.

    bash benchmarks/gpu/run.sh python3 benchmarks/gpu/vllm_smoke.py          # ~2-4 min incl. engine start
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


async def checks(results: dict) -> None:
    from benchmarks.gpu.model_shapes import make_adapter, make_model_dir
    from raydistill.agent import run_episode
    from raydistill.config.agent import AgentConfig, SagConfig
    from raydistill.config.engine import EngineConfig
    from raydistill.engines import ChatRequest, PromptTooLongError, SamplingParams, create_engine

    model_dir = str(make_model_dir("qwen2.5-0.5b", "/tmp/raydistill-bench/qwen2.5-0.5b"))
    adapter = make_adapter(model_dir, "/tmp/raydistill-bench/lora-r8")
    cfg = EngineConfig(backend="vllm", model=model_dir, load_format="dummy", dtype="bfloat16", max_model_len=4096,
                       gpu_memory_utilization=0.5, max_num_seqs=64, lora_adapter=adapter, max_lora_rank=8,
                       enforce_eager=True)
    t = time.perf_counter()
    eng = create_engine(cfg)
    results["engine_start_s"] = round(time.perf_counter() - t, 1)

    def check(name: str, ok: bool, info=None) -> None:
        results["checks"][name] = {"ok": bool(ok), "info": info}
        print(f"{'ok  ' if ok else 'FAIL'} {name} {info if info is not None else ''}", flush=True)

    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]
    [c] = await eng.generate(ChatRequest(messages=msgs), SamplingParams(max_tokens=16, ignore_eos=True))
    check("chat_fixed_length", c.completion_tokens == 16 and c.finish_reason == "length",
          [c.completion_tokens, c.finish_reason])
    p = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=3, logprobs=True, ignore_eos=True)
    a = await eng.generate(ChatRequest(messages=msgs), p)
    b = await eng.generate(ChatRequest(messages=msgs), p)
    check("n4_logprobs_seed", len(a) == 4 and all(x.cumulative_logprob is not None and x.cumulative_logprob < 0
                                                   for x in a) and [x.token_ids for x in a] == [x.token_ids for x in b],
          [round(x.cumulative_logprob or 0, 2) for x in a])
    text = a[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2] if len(text) > 4 else None
    if stop and stop.strip():
        [s] = await eng.generate(ChatRequest(messages=msgs), p.replace(n=1, stop=(stop,)))
        check("stop_string", s.finish_reason == "stop" and s.stop_reason == stop and stop not in s.text,
              [s.finish_reason, s.stop_reason])
    # no stop strings: vLLM does not detokenize and the engine decodes the final ids once; same text as vLLM's
    [d] = await eng.generate(ChatRequest(messages=msgs), p.replace(n=1, stop=("\x00never\x00",)))
    [nd] = await eng.generate(ChatRequest(messages=msgs), p.replace(n=1))
    check("decode_once_matches_vllm_detok", d.token_ids == nd.token_ids and d.text == nd.text and bool(nd.text),
          [len(d.text), len(nd.text)])
    [tk] = await eng.generate(ChatRequest(prompt_token_ids=[100, 200, 300]), SamplingParams(max_tokens=5,
                                                                                          ignore_eos=True))
    check("token_prompt", tk.prompt_tokens == 3 and tk.completion_tokens == 5)
    cont = ChatRequest(messages=[*msgs, {"role": "assistant", "content": "Thought: first.\n\n"}],
                       continue_final_message=True)
    [cc] = await eng.generate(cont, SamplingParams(max_tokens=4, ignore_eos=True))
    check("continue_final_message", cc.completion_tokens == 4)
    try:
        await eng.generate(ChatRequest(prompt_token_ids=[100] * 5000), SamplingParams(max_tokens=4))
        check("prompt_too_long", False)
    except PromptTooLongError:
        check("prompt_too_long", True)
    await eng.reset_prefix_cache()
    check("reset_prefix_cache", True)
    check("lora_request", eng.lora_request is not None, getattr(eng.lora_request, "lora_name", None))

    rec = {"id": "smoke/1", "question": "What is 2 + 2?", "answer": "4", "domain": "math", "source": "smoke"}
    t = time.perf_counter()
    trajs = await asyncio.gather(*(run_episode(eng, None, {**rec, "id": f"smoke/{i}"},
                                               AgentConfig(max_steps=2, max_new_tokens=32), role="student")
                                   for i in range(16)))
    check("episodes_plain", all(x.error is None and len(x.steps) == 2 and x.max_steps_reached for x in trajs),
          {"s": round(time.perf_counter() - t, 2), "errors": [x.error for x in trajs if x.error][:2]})
    sag = await run_episode(eng, None, rec, AgentConfig(max_steps=2, max_new_tokens=32,
                                                        sag=SagConfig(enabled=True, n=4)), role="student")
    v = json.loads(sag.steps[0].sag) if sag.steps and sag.steps[0].sag else None
    check("episode_sag4", sag.error is None and v is not None and v["n"] == 4, v)
    ftp = await run_episode(eng, None, rec, AgentConfig(max_steps=1, max_new_tokens=16, ftp=True,
                                                        ftp_max_new_tokens=48), role="teacher", temperature=1.0, seed=1)
    check("episode_ftp", ftp.error is None and ftp.ftp_cot is not None,
          {"prefix": (ftp.ftp_prefix or "")[:60]})
    results["stats"] = eng.stats()
    await eng.aclose()


def main() -> int:
    results: dict = {"checks": {}}
    try:
        asyncio.run(checks(results))
    except Exception as e:
        results["exception"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    results["ok"] = "exception" not in results and all(c["ok"] for c in results["checks"].values())
    out = os.environ.get("OUT")
    if out:
        Path(out, "vllm_smoke.json").write_text(json.dumps(results, indent=1))
    print("RESULT " + json.dumps(results), flush=True)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
