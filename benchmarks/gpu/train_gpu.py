"""GPU benchmark of the train stage: LoRA on a random-weight Qwen2.5-1.5B-shaped student, packed agent-like data.

Measures, in one run on one host (meant for `nvidia-h200-x2`):
  plain      a plain single-process transformers + peft loop on GPU 0 (same data, same packing, same settings)
  ddp1/ddp2  the stage's Ray Train loop, DDP, 1 and 2 workers (one GPU each)
  zero2_1/2  the same with DeepSpeed ZeRO-2
  zero2_1_16k  ZeRO-2, 1 worker, rows of 16384 tokens instead of the stage default 32768
  anchor     ZeRO-2, 1 worker, on anchor-shaped data (all samples 4096 random tokens, loss on every token), rows
             of 16384 tokens = micro-batch 4 x seq 4096: directly comparable to the 24.0k tokens/s anchor (H200,
             Ray Train 1 worker, ZeRO-2, r64 all-linear, grad checkpointing, bf16)
and prints tokens/s (all real tokens, per step incl. data wait), per GPU, scaling efficiency 2 vs 1 GPU,
the stage vs the plain loop, and per-GPU vs the anchor; writes everything to $OUT/train_gpu.json.

Settings (METHOD.md §4): LoRA r64 / alpha 128 / dropout 0.05 on all linear layers, AdamW lr 2e-4, linear
schedule, bf16, gradient checkpointing, effective batch 8 trajectories, packed rows of <= 32768 tokens (--max-tokens).
Data: uniform 500-8000 tokens per trajectory, ~40% loss tokens (assistant turns between observations).
Steps: 2 warm-up + 16 measured per configuration (~8 minutes in all on 2 H200s, incl. model creation); each
result keeps its per-step [tokens, seconds, micro-batches, data wait] (`per_step`). A step's time follows its
number of micro-batches more than its tokens (~0.4 s host cost each), which is why the stage deals rows evenly
and defaults to 32,768-token rows (docs/benchmarks.md, Training, fourth session).

    PYTHONPATH=/tmp/site:$PWD python benchmarks/gpu/train_gpu.py            # on the GPU machine
    python benchmarks/gpu/train_gpu.py --tiny --only plain,ddp1,ddp2        # CPU smoke run (tiny model)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from raydistill.train.loop import default_env  # noqa: E402

QWEN15B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
               intermediate_size=8960, vocab_size=151936)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=2048)
ANCHOR_TOK_S = 24_000.0
RAY_CONFIGS = {  # name: (strategy, workers, rows of 16384 tokens instead of --max-tokens)
    "ddp1": ("ddp", 1, False), "ddp2": ("ddp", 2, False), "zero2_1": ("zero2", 1, False),
    "zero2_2": ("zero2", 2, False), "zero2_1_16k": ("zero2", 1, True), "anchor": ("zero2", 1, True)}
CONFIGS = ("plain", *RAY_CONFIGS)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_model(path: Path, shape: dict, gpu: bool) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (path / "config.json").exists():
        return
    cfg = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
                      rms_norm_eps=1e-6, use_cache=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if gpu else torch.float32
    with torch.device("cuda" if gpu else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    del model
    if gpu:
        torch.cuda.empty_cache()


def agent_like_rows(n: int, lo: int, hi: int, vocab: int, seed: int, loss_frac: float = 0.4) -> list[dict]:
    """Trajectories: a masked prompt, then assistant turns (loss) alternating with observations (no loss)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(lo, hi + 1))
        ids = rng.integers(1000 if vocab > 4000 else 5, vocab - 1, length).astype(np.int32)
        mask = np.zeros(length, dtype=np.int8)
        pos = min(length - 2, int(rng.integers(150, 400)) if length > 800 else length // 5)  # system + task
        while pos < length:
            turn = int(rng.integers(60, 400))
            mask[pos:pos + turn] = 1
            pos += turn
            pos += int(turn * (1 - loss_frac) / loss_frac * rng.uniform(0.5, 1.5))  # observation
        mask[0] = 0
        rows.append({"id": f"bench/{i}", "sample": 0, "kind": "agent", "input_ids": ids.tolist(),
                     "loss_mask": mask.tolist(), "num_tokens": length, "num_loss_tokens": int(mask.sum())})
    return rows


def anchor_rows(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids = rng.integers(1000 if vocab > 4000 else 5, vocab - 1, length).astype(np.int32)
        mask = np.ones(length, dtype=np.int8)
        mask[0] = 0
        rows.append({"id": f"anchor/{i}", "sample": 0, "kind": "agent", "input_ids": ids.tolist(),
                     "loss_mask": mask.tolist(), "num_tokens": length, "num_loss_tokens": length - 1})
    return rows


def write_parquet(rows: list[dict], path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("sample", pa.int32()), ("kind", pa.string()),
                        ("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                        ("num_tokens", pa.int32()), ("num_loss_tokens", pa.int32())])
    path.mkdir(parents=True, exist_ok=True)
    f = path / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
    return [str(f)]


def summarize(metrics: list[dict], warmup: int, gpus: int) -> dict:
    timed = [m for m in metrics if m["step"] > warmup]
    tokens, secs = sum(m["tokens"] for m in timed), sum(m["step_time_s"] for m in timed)
    return {"steps": len(timed), "tokens": tokens, "seconds": round(secs, 3),
            "tokens_per_s": round(tokens / secs, 1) if secs else None,
            "tokens_per_s_per_gpu": round(tokens / secs / gpus, 1) if secs else None,
            "loss_tokens_frac": round(sum(m["loss_tokens"] for m in timed) / max(tokens, 1), 3),
            "padded_frac": round(1 - tokens / max(sum(m["padded_tokens"] for m in timed), 1), 4),
            "dummy_micro_batches": sum(m.get("dummy_micro_batches", 0) for m in timed),
            "micro_batches": sum(m.get("micro_batches", 0) for m in timed),
            "data_s": round(sum(m.get("data_s", 0) for m in timed), 3),
            "max_memory_gb": max((m.get("max_memory_gb", 0) for m in metrics), default=None),
            "loss_first_last": [round(metrics[0]["loss"], 4), round(metrics[-1]["loss"], 4)],
            "per_step": [[m["tokens"], round(m["step_time_s"], 3), m.get("micro_batches"), m.get("data_s")]
                         for m in timed]}


# ------------------------------------------------------------------------------------------- plain loop
def plain_loop(model_dir: str, rows: list[dict], a: dict, queue) -> None:
    """What one would write without Ray: one process, one GPU, transformers + peft + AdamW, same batches."""
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from raydistill.train.attention import check_packed_isolation, describe, resolve_attn_implementation
        from raydistill.train.packing import Sample, loss_sum, pack

        gpu = a["gpu"]
        device = torch.device("cuda:0" if gpu else "cpu")
        attn = resolve_attn_implementation("auto", on_gpu=gpu, packing=True)
        check_packed_isolation(attn, device)  # as the stage: probes torch's varlen kernel, falls back softly
        attn_path = describe(attn, device)
        print(f"plain: attention {attn_path}", flush=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32,
                                                     attn_implementation=attn).to(device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=a["r"], lora_alpha=2 * a["r"], lora_dropout=0.05,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, fused=gpu or None)
        total = len(rows) // a["batch"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / total))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
        model.train()
        metrics = []
        for step in range(1, a["steps"] + 1):
            t0 = time.perf_counter()
            batch = [Sample.from_row(r) for r in rows[(step - 1) * a["batch"]: step * a["batch"]]]
            n_targets = sum(s.num_targets for s in batch)
            loss_total = 0.0
            mbs = pack(batch, a["max_tokens"], a["pad"], 0)
            for mb in mbs:
                with autocast:
                    loss = loss_sum(model, mb, device, attn.startswith("flash"))
                (loss / n_targets).backward()
                loss_total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if gpu:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tokens = sum(len(s) for s in batch)
            metrics.append({"step": step, "loss": loss_total / n_targets, "tokens": tokens,
                            "loss_tokens": n_targets, "padded_tokens": tokens, "step_time_s": dt,
                            "micro_batches": len(mbs),
                            "max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else 0})
            print(f"plain step {step}: {tokens / dt:.0f} tokens/s", flush=True)
        queue.put({"metrics": metrics, "attn": attn_path})
    except BaseException as e:  # report, don't hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})


def run_plain(model_dir: str, rows: list[dict], a: dict) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # keeps CUDA out of the driver, which Ray's GPU workers share
    q = ctx.Queue()
    p = ctx.Process(target=plain_loop, args=(model_dir, rows, a, q))
    p.start()
    out = q.get()
    p.join()
    if "error" in out:
        raise RuntimeError(out["error"] + "\n" + out["trace"])
    return out


# ------------------------------------------------------------------------------------------- Ray runs
def run_ray(name: str, model_dir: str, files: list[str], n_rows: int, strategy: str, workers: int, a: dict,
            root: Path, max_tokens: int) -> dict:
    from raydistill.stages.train import make_trainer
    from raydistill.train.loop import METRICS_FILE, LoopSettings

    s = LoopSettings(model=model_dir, dataset_rows=n_rows, strategy=strategy, use_gpu=a["gpu"], bf16=True,
                     attn_implementation="auto", gradient_checkpointing=True, lora_r=a["r"], lora_alpha=2 * a["r"],
                     lora_dropout=0.05, lr=2e-4, epochs=1, effective_batch_size=a["batch"],
                     max_tokens_per_batch=max_tokens, pad_to_multiple_of=a["pad"], max_steps=a["steps"],
                     checkpoint_every_steps=10**6,
                     seed=0, shuffle_buffer=0, progress=False, live_metrics_path=str(root / name / METRICS_FILE))
    trainer = make_trainer(s, files, num_workers=workers, use_gpu=a["gpu"], cpus_per_worker=a["cpus_per_worker"],
                           gpus_per_worker=1, storage_path=str(root / "ckpt"), run_name=f"{name}-{time.time_ns()}",
                           num_to_keep=1, ingest="driver" if not a["gpu"] else "read_parquet")
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    with result.checkpoint.as_directory() as d:
        metrics = [json.loads(x) for x in (Path(d) / METRICS_FILE).read_text().splitlines() if x.strip()]
    return {"metrics": metrics, "wall_s": round(wall, 1)}


def main() -> int:
    # What every Ray Train worker of the stage sets (NVLink multicast off, cuDNN attention not preferred), so the
    # plain loop (spawned from here, inheriting it) matches; and Ray on loopback without usage stats. Set here,
    # not at import: train_profile.py imports this module and its `*_default` variants need torch's defaults.
    default_env()
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(k, v)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, short samples, gloo")
    ap.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--measure", type=int, default=16)
    ap.add_argument("--pad", type=int, default=64, help="pad packed rows to a multiple of this (stage default 64)")
    ap.add_argument("--max-tokens", type=int, default=32768, help="tokens per packed micro-batch (the stage default)")
    ap.add_argument("--workdir", default="/tmp/raydistill-train-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(only) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")

    import torch

    gpu = torch.cuda.is_available() and not args.tiny
    n_gpus = torch.cuda.device_count() if gpu else 0
    shape = TINY if args.tiny else QWEN15B
    steps = args.warmup + args.measure
    a = {"gpu": gpu, "r": 8 if args.tiny else 64, "batch": 8, "max_tokens": 1024 if args.tiny else args.max_tokens,
         "steps": steps, "cpus_per_worker": 0.5 if args.tiny else 4, "pad": args.pad}
    root = Path(args.workdir)
    shutil.rmtree(root / "ckpt", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "gpus": n_gpus,
           "gpu_name": torch.cuda.get_device_name(0) if gpu else None}
    for pkg in ("transformers", "peft", "ray", "deepspeed", "flash_attn"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception as e:
            env[pkg] = f"missing ({type(e).__name__})"
    log(f"env: {env}")

    t0 = time.time()
    model_dir = root / ("model-tiny" if args.tiny else "model-qwen2.5-1.5b-shape")
    make_model(model_dir, shape, gpu)
    lo, hi = (50, 400) if args.tiny else (500, 8000)
    rows = agent_like_rows(a["batch"] * steps * 2, lo, hi, shape["vocab_size"], seed=1)
    files = write_parquet(rows, root / "data-agent")
    a_rows = anchor_rows(a["batch"] * steps, 256 if args.tiny else 4096, shape["vocab_size"], seed=2)
    a_files = write_parquet(a_rows, root / "data-anchor")
    log(f"model + data ready in {time.time() - t0:.0f}s: {len(rows)} agent-like rows, mean "
        f"{sum(r['num_tokens'] for r in rows) / len(rows):.0f} tokens, "
        f"{sum(r['num_loss_tokens'] for r in rows) / sum(r['num_tokens'] for r in rows):.2f} loss tokens")

    results: dict[str, dict] = {}
    if "plain" in only:
        try:
            out = run_plain(str(model_dir), rows, a)
            results["plain"] = {"gpus": 1, "attn": out["attn"], **summarize(out["metrics"], args.warmup, 1)}
        except Exception as e:
            results["plain"] = {"error": str(e)[:2000]}
        log(f"plain: {results['plain']}")
    ray_cfgs = [(c, *RAY_CONFIGS[c]) for c in RAY_CONFIGS if c in only]
    if ray_cfgs:
        from raydistill.config.ray import RayConfig
        from raydistill.stages.ray_init import init_ray

        try:
            init_ray(RayConfig(num_cpus=4 if args.tiny else None, num_gpus=n_gpus if gpu else 0))
        except Exception as e:  # fail soft: record why, still write the report
            for name, *_ in ray_cfgs:
                results[name] = {"error": f"ray init failed: {type(e).__name__}: {str(e)[:500]}"}
            ray_cfgs = []
        for name, strategy, workers, rows_16k in ray_cfgs:
            if gpu and workers > n_gpus:
                results[name] = {"error": f"needs {workers} GPUs, have {n_gpus}"}
                continue
            if strategy != "ddp" and env["deepspeed"].startswith("missing"):
                results[name] = {"error": "deepspeed not importable"}
                continue
            f, n = (a_files, len(a_rows)) if name == "anchor" else (files, len(rows))
            try:
                mt = min(a["max_tokens"], 1024 if args.tiny else 16384) if rows_16k else a["max_tokens"]
                out = run_ray(name, str(model_dir), f, n, strategy, workers, a, root, mt)
                results[name] = {"gpus": workers, "strategy": strategy, "max_tokens": mt, "wall_s": out["wall_s"],
                                 "attn": out["metrics"][-1].get("attn") if out["metrics"] else None,
                                 **summarize(out["metrics"], args.warmup, workers)}
            except Exception as e:
                results[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            log(f"{name}: {results[name]}")

    def tps(name: str, per_gpu: bool = False) -> float | None:
        r = results.get(name, {})
        return r.get("tokens_per_s_per_gpu" if per_gpu else "tokens_per_s")

    derived = {}
    for strat, one_name, two_name in (("ddp", "ddp1", "ddp2"), ("zero2", "zero2_1", "zero2_2")):
        one, two = tps(one_name), tps(two_name)
        if one and two:
            derived[f"{strat}_scaling_efficiency_2gpu"] = round(two / (2 * one), 3)
        if one and tps("plain"):
            derived[f"{strat}_1gpu_vs_plain"] = round(one / tps("plain"), 3)
    if not args.tiny:
        for name in (*RAY_CONFIGS, "plain"):
            if tps(name, True):
                derived[f"{name}_per_gpu_vs_anchor_24.0k"] = round(tps(name, True) / ANCHOR_TOK_S, 3)
    report = {"env": env, "settings": {**a, "warmup_steps": args.warmup, "measured_steps": args.measure,
                                       "shape": shape, "lengths": [lo, hi]},
              "results": results, "derived": derived, "total_s": round(time.time() - t0, 1)}

    print("\n| config | GPUs | tokens/s | tokens/s/GPU | loss-token frac | max mem GB | wall s | attention |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | - | error: {r['error'][:80]} | | | | | |")
        else:
            print(f"| {name} | {r['gpus']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | "
                  f"{r['loss_tokens_frac']} | {r['max_memory_gb']} | {r.get('wall_s', '-')} | {r.get('attn')} |")
    for k, v in derived.items():
        print(f"{k}: {v}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_gpu.json").write_text(json.dumps(report, indent=1))
    log(f"wrote {out_dir / 'train_gpu.json'} ({report['total_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
