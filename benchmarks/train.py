"""CPU benchmark of the training data path: packing vs padding on agent-like length distributions.

Part 1 (exact, machine-independent): for effective batch 8 on 1 or 2 workers, how many tokens each strategy
computes per real token (padding waste), how many micro-batches it needs, and the attention work
(sum of per-sample L^2 for varlen attention vs. L^2 per padded/dense row), over many sampled batches.
Part 2 (timed, noisy on a shared box): real tokens/s of the loop (LocalRuntime, one process, tiny model) with
packing vs length-sorted padding on the same agent-like rows.

    python benchmarks/train.py [--batches 500] [--no-timed] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill.train.loop import balance  # noqa: E402
from raydistill.train.packing import Sample, pack, pad_batches  # noqa: E402


def lengths(rng: np.random.Generator, dist: str, n: int) -> np.ndarray:
    if dist == "uniform":
        return rng.integers(500, 8001, n)
    return np.exp(rng.uniform(np.log(500), np.log(8000), n)).astype(int)  # log-uniform: many short, long tail


def waste(batches: int, dist: str, workers: int, max_tokens: int, mbs: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    real = computed_pack = computed_pad = 0
    rows_pack = rows_pad = 0
    attn_var = attn_dense_pack = attn_pad = 0.0
    imbalance, imbalance_raw = [], []
    for _ in range(batches):
        lens = lengths(rng, dist, 8)
        samples = [Sample(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int8)) for n in lens]
        parts = balance(samples, workers)
        loads = [sum(len(s) for s in p) for p in parts]
        imbalance.append(max(loads) / (sum(loads) / workers))
        shard = [int(lens[w::workers].sum()) for w in range(workers)]  # what each worker read, unbalanced
        imbalance_raw.append(max(shard) / (sum(shard) / workers))
        for part in parts:
            packed = pack(part, max_tokens)
            padded = pad_batches(part, mbs, 0)
            real += sum(len(s) for s in part)
            computed_pack += sum(r.padded_tokens for r in packed)
            computed_pad += sum(r.padded_tokens for r in padded)
            rows_pack += len(packed)
            rows_pad += len(padded)
            attn_var += sum(float(len(s)) ** 2 for s in part)
            attn_dense_pack += sum(float(r.num_tokens) ** 2 for r in packed)
            attn_pad += sum(r.input_ids.shape[0] * float(r.input_ids.shape[1]) ** 2 for r in padded)
    return {"dist": dist, "workers": workers, "batches": batches, "mean_len": round(real / batches / 8),
            f"padding_waste_padded_mb{mbs}": round(computed_pad / real - 1, 3),
            "padding_waste_packed": round(computed_pack / real - 1, 3),
            "micro_batches_per_step_padded": round(rows_pad / batches / workers, 2),
            "micro_batches_per_step_packed": round(rows_pack / batches / workers, 2),
            "attention_dense_row_vs_varlen": round(attn_dense_pack / attn_var, 2),
            "attention_padded_vs_varlen": round(attn_pad / attn_var, 2),
            "worker_tokens_max_over_mean_balanced": round(float(np.mean(imbalance)), 3),
            "worker_tokens_max_over_mean_as_read": round(float(np.mean(imbalance_raw)), 3)}


def timed(steps: int) -> dict:
    """Tiny model, one process: real tokens/s of packing (sdpa_varlen) vs padding (sdpa) on the same rows."""
    from raydistill.train.loop import LocalRuntime, LoopSettings, run

    rng = np.random.default_rng(1)
    rows = []
    for i in range(8 * steps):
        n = int(np.exp(rng.uniform(np.log(50), np.log(800))))
        mask = (rng.random(n) < 0.4).astype(np.int8)
        rows.append({"id": str(i), "sample": 0, "input_ids": rng.integers(5, 2000, n).tolist(),
                     "loss_mask": mask.tolist()})
    out = {}
    for name, kw in (("packed", {"packing": True, "max_tokens_per_batch": 2048}),
                     ("padded_mb4", {"packing": False, "micro_batch_size": 4, "attn_implementation": "sdpa"})):
        with tempfile.TemporaryDirectory() as d:
            s = LoopSettings(model="tiny:qwen2-small", dataset_rows=len(rows), epochs=1, effective_batch_size=8,
                             lora_r=8, lora_alpha=16, progress=False, checkpoint_every_steps=10**6,
                             live_metrics_path=f"{d}/m.jsonl", **kw)
            run(s, LocalRuntime(rows, f"{d}/ckpt"))
            ms = [json.loads(x) for x in Path(f"{d}/m.jsonl").read_text().splitlines()][1:]  # drop warm-up step
        out[name] = round(sum(m["tokens"] for m in ms) / sum(m["step_time_s"] for m in ms), 1)
    out["packed_vs_padded"] = round(out["packed"] / out["padded_mb4"], 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-timed", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()
    report = {"waste": [waste(args.batches, dist, w, 16384, 4) for dist in ("uniform", "loguniform")
                        for w in (1, 2)]}
    for r in report["waste"]:
        print(json.dumps(r))
    if not args.no_timed:
        report["timed_cpu_tokens_per_s"] = timed(args.steps)
        print(json.dumps(report["timed_cpu_tokens_per_s"]))
    report["seconds"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
