"""Why is packed agent data slower per token than anchor-shaped data? One GPU, one process, about 2-3 minutes.

The first train_gpu.py run on nvidia-h200-x2 gave 22.4k tokens/s on anchor-shaped data (4096-token samples,
loss on every token) but only 10-11k tokens/s on packed agent-like data (500-8000 tokens, 40% loss), in the
plain loop as much as in the stage - so the cause is in the model step, not in Ray. Suspect: recent torch puts
cuDNN attention first on sm90, and cuDNN builds one graph per new sequence length (forward and backward); the
per-sample SDPA loop of that run met ~8 new lengths per step, the anchor only ever 4096.

This script times the same training step (Qwen2.5-1.5B shape, LoRA r64 all-linear, bf16 autocast, gradient
checkpointing, fused AdamW, effective batch 8 packed into rows <= 16,384 tokens) on variants that each change
one thing; every measured step takes 8 new trajectories (new lengths), except `loop_default#2`, which replays
the rows of `loop_default` (lengths seen before: if it is much faster, per-shape costs are the cause):

  sdpa_micro            SDPA fwd+bwd (1, 12, L, 128) at 6 new lengths: torch's default backend vs cuDNN excluded
  loop_default          per-sample SDPA, torch's default backend choice (what the first GPU run used), rows unpadded
  loop_default#2        the same rows again
  loop_nocudnn          per-sample SDPA with cuDNN excluded (flash / efficient) - the fix in attention.py
  loop_nocudnn_p64      + rows padded to a multiple of 64 (the stage default)
  varlen_p64            torch.nn.attention.varlen (one call per layer), if the start-up probe accepts it
  varlen_p64_allloss    + loss on every token (the LM-head / logits_to_keep share)
  anchor_default        anchor-shaped data, per-sample SDPA, default backend (train_gpu.py's `anchor`)
  anchor_best           anchor-shaped data on the fastest agent path
Then one profiled step of `loop_default` and of the fastest variant: top CUDA kernels and top host ops.
Each variant fails soft (its error is recorded, the rest go on). Output: $OUT/train_profile.json and
$OUT/train_profile_tables.txt.

    bash benchmarks/gpu/run.sh python3 benchmarks/gpu/train_profile.py       # GPU (one is enough)
    python benchmarks/gpu/train_profile.py --tiny                           # CPU smoke run (tiny model)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

from raydistill.config.ray import MULTICAST_OFF  # noqa: E402

for _k, _v in {**MULTICAST_OFF, "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)
# NOT setting TORCH_CUDNN_SDPA_PREFERRED here: `*_default` variants must see torch's own backend choice.

import train_gpu as tg  # noqa: E402


def sdpa_micro(gpu: bool, tiny: bool) -> dict:
    """Per-new-length cost of SDPA fwd+bwd with torch's default backend vs with cuDNN excluded."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    heads, dim = (4, 16) if tiny else (12, 128)

    def fwd_bwd_ms(q, k, v, backends) -> float:
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with sdpa_kernel(backends) if backends is not None else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.sum().backward()
        if gpu:
            torch.cuda.synchronize()
        return round((time.perf_counter() - t) * 1e3, 2)

    out = {}
    for name, backends in (("default", None), ("no_cudnn", [SDPBackend.FLASH_ATTENTION,
                                                            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])):
        base = 1000 if name == "default" else 3000  # disjoint lengths: nothing cached from the other variant
        times = []
        for i in range(6):
            n = (base + 37 * i + 1) if not tiny else (50 + 7 * i + (0 if name == "default" else 3))
            q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            times.append(fwd_bwd_ms(q, k, v, backends))
        # the same length again: cached plans, if any
        out[name] = {"new_length_ms": times, "repeat_length_ms": fwd_bwd_ms(q, k, v, backends)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, short samples")
    ap.add_argument("--steps", type=int, default=None,
                    help="measured steps per variant after 1 warm-up step (default 2; 1 with --tiny)")
    ap.add_argument("--no-profile", action="store_true", help="skip the two torch.profiler steps")
    ap.add_argument("--workdir", default="/tmp/raydistill-train-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raydistill.train import attention
    from raydistill.train.packing import Sample, loss_sum, pack

    t0 = time.time()
    if args.steps is None:
        args.steps = 1 if args.tiny else 2
    gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda:0" if gpu else "cpu")
    shape = tg.TINY if args.tiny else tg.QWEN15B
    max_tokens = 256 if args.tiny else 16384
    lo, hi, fixed = (20, 120, 64) if args.tiny else (500, 8000, 4096)
    root = Path(args.workdir)
    model_dir = root / ("model-tiny" if args.tiny else "model-qwen2.5-1.5b-shape")
    tg.make_model(model_dir, shape, gpu)
    env: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if gpu else None,
                 "cudnn": torch.backends.cudnn.version() if gpu else None}
    if gpu:
        b = torch.backends.cuda
        env.update(flash=b.flash_sdp_enabled(), mem_efficient=b.mem_efficient_sdp_enabled(),
                   cudnn_sdp=b.cudnn_sdp_enabled(),
                   capability=list(torch.cuda.get_device_capability(0)))
        try:
            env["sdp_priority"] = [str(x) for x in torch._C._get_sdp_priority_order()]
        except Exception as e:
            env["sdp_priority"] = f"unavailable ({type(e).__name__})"
    try:
        from torch.nn.attention.varlen import varlen_attn

        env["varlen_attn_signature"] = attention._signature(varlen_attn)
    except Exception as e:
        env["varlen_attn_signature"] = f"missing ({type(e).__name__}: {e})"
    kernel = attention.probe_torch_varlen(device, torch.bfloat16) if gpu else None
    env["varlen_probe"] = (f"ok, native_gqa={kernel.native_gqa}" if kernel else
                           "not usable (see the log line above)" if gpu else "CPU run: not probed")
    print("env", json.dumps(env), flush=True)
    results: dict = {}
    try:
        results["sdpa_micro"] = sdpa_micro(gpu, args.tiny)
    except Exception as e:
        results["sdpa_micro"] = {"error": f"{type(e).__name__}: {e}"}
    print("sdpa_micro", json.dumps(results["sdpa_micro"]), flush=True)

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
    per = 8 * (args.steps + 1)
    agent = tg.agent_like_rows(per * 8, lo, hi, shape["vocab_size"], seed=1)  # fresh rows for every variant
    anchor = tg.anchor_rows(per * 2, fixed, shape["vocab_size"], seed=2)
    offsets: dict[int, int] = {}

    def take(pool, n):  # the next n unused rows of a pool: no variant sees another's lengths
        i = offsets.get(id(pool), 0)
        offsets[id(pool)] = i + n
        return pool[i:i + n]

    def step(rows, pad_to):
        batch = [Sample.from_row(r) for r in rows]
        n_targets = sum(s.num_targets for s in batch)
        mbs = pack(batch, max_tokens, pad_to, 0)
        for mb in mbs:
            with autocast:
                loss = loss_sum(model, mb, device)
            (loss / n_targets).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(len(s) for s in batch), [mb.padded_tokens for mb in mbs]

    def configure(varlen: bool, avoid_cudnn: bool) -> None:
        attention.AVOID_CUDNN = avoid_cudnn
        attention._VARLEN = kernel if (varlen and kernel) else False

    def timed(name, rows, pad_to, varlen, avoid_cudnn):
        try:
            if varlen and not kernel:
                raise RuntimeError("torch varlen kernel not usable here (probe: " + env["varlen_probe"] + ")")
            configure(varlen, avoid_cudnn)
            step(rows[:8], pad_to)  # warm-up (its own lengths)
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t, tokens, step_s, rows_per_step = time.perf_counter(), 0, [], []
            for i in range(1, len(rows) // 8):
                ts = time.perf_counter()
                n, row_lens = step(rows[8 * i: 8 * (i + 1)], pad_to)
                if gpu:
                    torch.cuda.synchronize()
                step_s.append(round(time.perf_counter() - ts, 3))
                tokens += n
                rows_per_step.append(row_lens)
            dt = time.perf_counter() - t
            res = {"tokens_per_s": round(tokens / dt, 1), "tokens": tokens, "seconds": round(dt, 3),
                   "step_s": step_s, "rows_per_step": rows_per_step,
                   "attn": attention.describe(attn, device) if (avoid_cudnn or varlen or not gpu)
                   else f"{attn}/sdpa_per_sample(torch default backend)"}
            if gpu:
                res["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {str(e)[:500]}", "trace": traceback.format_exc()[-1500:]}
        print(name, json.dumps({k: v for k, v in res.items() if k != "trace"}), flush=True)
        return res

    default_rows = take(agent, per)
    variants = [("loop_default", default_rows, 1, False, False),
                ("loop_default#2", default_rows, 1, False, False),
                ("loop_nocudnn", take(agent, per), 1, False, True),
                ("loop_nocudnn_p64", take(agent, per), 64, False, True),
                ("varlen_p64", take(agent, per), 64, True, True)]
    allloss = [{**r, "loss_mask": [0] + [1] * (len(r["input_ids"]) - 1)} for r in take(agent, per)]
    variants.append(("varlen_p64_allloss", allloss, 64, True, True))
    variants.append(("anchor_default", take(anchor, per), 64, False, False))
    for name, rows, pad_to, varlen, avoid in variants:
        results[name] = timed(name, rows, pad_to, varlen, avoid)
    agent_names = ("loop_nocudnn", "loop_nocudnn_p64", "varlen_p64")
    ok = {n: results[n]["tokens_per_s"] for n in agent_names if "tokens_per_s" in results[n]}
    best = max(ok, key=ok.get) if ok else None
    best_cfg = {n: (p, v, a) for n, _, p, v, a in variants}.get(best)
    if best_cfg:
        results["anchor_best"] = timed(f"anchor_best ({best})", take(anchor, per), *best_cfg)
    base = results["anchor_default"].get("tokens_per_s")
    summary = {n: {"tokens_per_s": r.get("tokens_per_s"), "vs_anchor_default":
                   round(r["tokens_per_s"] / base, 3) if base and r.get("tokens_per_s") else None,
                   "vs_anchor_24.0k": round(r["tokens_per_s"] / tg.ANCHOR_TOK_S, 3)
                   if r.get("tokens_per_s") and gpu else None}
               for n, r in results.items() if n != "sdpa_micro"}
    summary["fastest_agent_variant"] = best

    tables = []
    top: dict = {}
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        for name, cfg in (("loop_default", (1, False, False)), (best, best_cfg)):
            if not cfg:
                continue
            try:
                configure(cfg[1], cfg[2])
                rows = take(agent, 8)
                with profile(activities=activities) as prof:
                    step(rows, cfg[0])
                    if gpu:
                        torch.cuda.synchronize()
                avgs = prof.key_averages()
                entry = {}
                for key in (["self_cuda_time_total"] if gpu else []) + ["self_cpu_time_total"]:
                    table = avgs.table(sort_by=key, row_limit=20, max_name_column_width=70)
                    tables.append(f"==== {name}: sorted by {key}\n{table}")
                    print(tables[-1], flush=True)
                    attr = "self_device_time_total" if key == "self_cuda_time_total" else key
                    rows_ = sorted(avgs, key=lambda e, a=attr: -getattr(e, a, getattr(e, key, 0)))[:25]
                    entry[key] = [{"name": e.key[:120], "calls": e.count,
                                   "self_ms": round(getattr(e, attr, getattr(e, key, 0)) / 1e3, 2)} for e in rows_]
                top[name] = entry
            except Exception as e:
                top[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"profile {name} failed: {e}", flush=True)

    report = {"env": env, "results": results, "summary": summary, "profile_top": top,
              "total_s": round(time.time() - t0, 1),
              "mean_agent_len": float(np.mean([len(r["input_ids"]) for r in agent]))}
    print("\n| variant | tokens/s | vs anchor_default | vs 24.0k | attention path |")
    print("|---|---|---|---|---|")
    for n, r in results.items():
        if n == "sdpa_micro":
            continue
        sm = summary[n]
        print(f"| {n} | {r.get('tokens_per_s', 'error: ' + r.get('error', '')[:60])} | {sm['vs_anchor_default']} |"
              f" {sm['vs_anchor_24.0k']} | {r.get('attn', '-')} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_profile.json").write_text(json.dumps(report, indent=1))
    (out / "train_profile_tables.txt").write_text("\n\n".join(tables))
    print(f"wrote {out / 'train_profile.json'} in {report['total_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
