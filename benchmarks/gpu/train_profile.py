"""Why is packed agent data slower per token than anchor-shaped data? One GPU, one process, ~2 minutes.

The first train_gpu.py run on nvidia-h200-x2 gave 22.4k tokens/s on anchor-shaped data (4096-token samples,
loss on every token) but only 10-11k tokens/s on packed agent-like data (500-8000 tokens, 40% loss), in the
plain loop as much as in the stage - so the cause is in the model step, not in Ray. This script times the
same training step (Qwen2.5-1.5B shape, LoRA r64 all-linear, bf16 autocast, gradient checkpointing, AdamW,
rows <= 16,384 tokens) on variants that each change one thing, then profiles one step of the slow case and
prints the CUDA kernels that take the time:

  agent_loop       agent data, sdpa_varlen as one SDPA call per sample (what the first GPU run used)
  agent_varlen     the same with PyTorch's varlen FlashAttention (one call per layer), if torch has it
  agent_varlen_p64 + rows padded to a multiple of 64 tokens (the stage's new default)
  agent_allloss    + loss on every token (is the loss-token subset / logits_to_keep path slow?)
  agent_len4096    agent-like masks but every sample 4096 tokens (is it the variable lengths?)
  anchor           anchor-shaped data (4096 tokens, loss everywhere), as in train_gpu.py's `anchor`
Each variant runs twice (`#1`, `#2`: the second time every shape has been seen before), then three
`fresh_*` variants on never-seen lengths; costs paid once per new shape show up as #1 << #2 and slow fresh_*.

    bash benchmarks/gpu/run.sh python3 benchmarks/gpu/train_profile.py          # writes $OUT/train_profile.json
    python benchmarks/gpu/train_profile.py --tiny                              # CPU smoke run
"""

from __future__ import annotations

import os

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import train_gpu as tg  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/raydistill-train-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raydistill.train import attention
    from raydistill.train.packing import Sample, loss_sum, pack

    gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda:0" if gpu else "cpu")
    shape = tg.TINY if args.tiny else tg.QWEN15B
    max_tokens = 1024 if args.tiny else 16384
    lo, hi, fixed = (50, 400, 256) if args.tiny else (500, 8000, 4096)
    root = Path(args.workdir)
    model_dir = root / ("model-tiny" if args.tiny else "model-qwen2.5-1.5b-shape")
    t0 = time.time()
    tg.make_model(model_dir, shape, gpu)
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if gpu else None,
           "varlen_attn": attention._varlen_fn() is not None}
    if gpu:
        b = torch.backends.cuda
        env.update(flash=b.flash_sdp_enabled(), mem_efficient=b.mem_efficient_sdp_enabled(),
                   cudnn=b.cudnn_sdp_enabled(), sdp_priority=list(torch._C._get_sdp_priority_order())
                   if hasattr(torch._C, "_get_sdp_priority_order") else None)
    print("env", json.dumps(env), flush=True)

    attn = attention.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32,
                                                 attn_implementation=attn).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8 if args.tiny else 64, lora_alpha=16 if args.tiny else 128,
                                             lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=gpu or None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
    model.train()
    n_rows = 8 * (args.steps + 1)
    agent = tg.agent_like_rows(n_rows, lo, hi, shape["vocab_size"], seed=1)
    anchor = tg.anchor_rows(n_rows, fixed, shape["vocab_size"], seed=2)
    allloss = [{**r, "loss_mask": [0] + [1] * (len(r["input_ids"]) - 1)} for r in agent]
    agent_fixed = tg.agent_like_rows(n_rows, fixed, fixed, shape["vocab_size"], seed=3)

    def step(rows, pad_to):
        batch = [Sample.from_row(r) for r in rows]
        n_targets = sum(s.num_targets for s in batch)
        for mb in pack(batch, max_tokens, pad_to, 0):
            with autocast:
                loss = loss_sum(model, mb, device)
            (loss / n_targets).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(len(s) for s in batch)

    def timed(name, rows, pad_to=1, varlen=True):
        attention._VARLEN = None if varlen else False
        step(rows[:8], pad_to)  # warm-up
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        tokens = sum(step(rows[8 * i: 8 * (i + 1)], pad_to) for i in range(1, args.steps + 1))
        if gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        res = {"tokens_per_s": round(tokens / dt, 1), "tokens": tokens, "seconds": round(dt, 3),
               "varlen_kernel": attention._varlen_fn() is not None}
        print(name, json.dumps(res), flush=True)
        return res

    fresh = [tg.agent_like_rows(n_rows, lo, hi, shape["vocab_size"], seed=10 + i) for i in range(3)]
    variants = [("agent_loop", agent, 1, False), ("agent_varlen", agent, 1, True),
                ("agent_varlen_p64", agent, 64, True), ("agent_allloss", allloss, 64, True),
                ("agent_len4096", agent_fixed, 64, True), ("anchor", anchor, 64, True)]
    results = {}
    for rnd in (1, 2):  # the second round sees the same shapes again: tells per-new-shape costs from steady ones
        for name, rows, pad_to, varlen in variants:
            results[f"{name}#{rnd}"] = timed(f"{name}#{rnd}", rows, pad_to, varlen)
    # never-seen lengths after everything is warm: loop vs varlen, unpadded vs padded to 64
    results["fresh_loop"] = timed("fresh_loop", fresh[0], 1, False)
    results["fresh_varlen"] = timed("fresh_varlen", fresh[1], 1, True)
    results["fresh_varlen_p64"] = timed("fresh_varlen_p64", fresh[2], 64, True)

    # One profiled step of the first (slowest expected) variant: which kernels take the time.
    from torch.profiler import ProfilerActivity, profile

    attention._VARLEN = False
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        step(agent[8:16], 1)
        if gpu:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
    print(table, flush=True)
    top = []
    for ev in sorted(prof.key_averages(), key=lambda e: -getattr(e, key.replace("_total", "_total"), 0))[:40]:
        top.append({"name": ev.key[:120], "calls": ev.count,
                    "self_us": round(getattr(ev, key), 1)})
    report = {"env": env, "results": results, "profile_top": top, "total_s": round(time.time() - t0, 1),
              "mean_agent_len": float(np.mean([len(r["input_ids"]) for r in agent]))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_profile.json").write_text(json.dumps(report, indent=1))
    (out / "train_profile_table.txt").write_text(table)
    print(f"wrote {out / 'train_profile.json'} in {report['total_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
