"""The distill job end to end on the GPU machine, submitted the way users do: `ray start --head` on
127.0.0.1 (token auth), `ray job submit --working-dir . -- python workflows/distill.py ...`, then the same
job again (every stage must be skipped). index -> generate (trajectories, filter, SFT data) -> train ->
evaluate -> report, with vLLM teacher and student of the random-weight Qwen2.5-0.5B shape
(`load_format: dummy`), Ray Train LoRA on the GPU, evaluation with the adapter through vLLM. Stage timings
come from the run's manifest; results in $OUT/distill_gpu.json, the last line printed is `RESULT {json}`.

    bash benchmarks/gpu/run.sh python3 benchmarks/gpu/distill_gpu.py          # one H200, ~4-6 min wall
    python benchmarks/gpu/distill_gpu.py --cpu                                 # CPU tiny mode (same driver)

Weights: vLLM needs none (`load_format: dummy`), but Ray Train loads the student with from_pretrained, so the
script saves one random-init bf16 checkpoint of the shape (config + tokenizer from model_shapes.py) once, with
transformers, to `<shape-dir>-weights` (on the GPU when there is one: seconds). Retrieval: the GPU machine has
neither sentence-transformers nor the packaged MiniLM, so the index and the web_search tool use the project's
ordinary `e5:<dir>` embedder path on a random-weight tiny BERT whose tokenizer is trained here on the bundled
text (`tiny_e5_dir`): retrieval is real (faiss flat index over the bundled 1,000-passage Wikipedia sample,
top-k hits in the observations), the ranking is meaningless. The same embedder is used in `--cpu` mode.
Default size (fits 7 min on one H200 including two vLLM engine starts with enforce_eager and one Ray Train
run): agent branch only, 32 questions per training set (2 sets), 3 agent steps of <= 256 new tokens,
16 questions per test set (2 sets); `--cot` adds the CoT baseline branch (a second train and eval variant:
about +2 min). Random weights: answers are gibberish and every step runs to max_new_tokens; the timings
measure the plumbing at real shapes, not quality. Needs the staged wheels (vLLM, Ray, torch, transformers,
peft, faiss-cpu, pyarrow, pydantic, math-verify).
`--direct` runs `python workflows/distill.py` without a job (if the dashboard cannot start there).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
OUT = Path(os.environ.get("OUT", "/tmp/out"))

from raydistill.stages.local_head import LocalRayHead  # noqa: E402
from raydistill.stages.ray_init import WORKER_ENV  # noqa: E402


def weights_dir(shape_dir: Path, dst: Path, seed: int = 0) -> Path:
    """Config + tokenizer of `shape_dir` plus random bf16 weights, saved once (Ray Train loads real files)."""
    if (dst / "model.safetensors").exists() or (dst / "model.safetensors.index.json").exists():
        return dst
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (shape_dir / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from model_shapes import make_model_dir

        make_model_dir("qwen2.5-0.5b", shape_dir)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in shape_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(shape_dir)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU to the job (this process only keeps its CUDA context)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def tiny_e5_dir(dst: Path, seed: int = 0) -> Path:
    """A random-weight tiny BERT + a byte-level BPE tokenizer trained on the bundled text, for `e5:<dir>`.

    Loaded by the project's ordinary e5 path (transformers AutoModel/AutoTokenizer, `query: `/`passage: `
    prefixes, mean pooling): needs neither sentence-transformers nor a hub. Built once (atomic rename).
    """
    if (dst / "config.json").exists() and (dst / "tokenizer.json").exists():
        return dst
    import torch
    from transformers import BertConfig, BertModel

    from raydistill.models.tiny import build_tokenizer

    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = build_tokenizer(2048)
    tok.model_max_length = 512
    tok.model_input_names = ["input_ids", "attention_mask"]
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=512,
                                 pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def gpu_config(model: Path, embedder: Path, run_dir: Path, questions: int, test_questions: int,
               max_new_tokens: int, max_steps: int, cot: bool) -> dict:
    # load_format dummy: vLLM initialises random weights itself (no 1 GB read); enforce_eager: no CUDA-graph
    # capture / torch.compile at engine start (tens of seconds each start; a 0.5B model does not need them).
    engine = {"backend": "vllm", "model": str(model), "dtype": "bfloat16", "max_model_len": 8192,
              "load_format": "dummy", "enforce_eager": True, "gpu_memory_utilization": 0.6, "num_gpus": 1,
              "max_num_seqs": 256}
    kinds = ["agent", "cot"] if cot else ["agent"]
    return {
        "run_dir": str(run_dir), "seed": 0, "ray": {"address": "local"},
        "data": {"train_sets": ["hotpotqa_1000", "math_1000"], "test_sets": ["hotpotqa_500", "math_500"],
                 "limit": questions},
        "teacher": engine, "student": {**engine, "max_lora_rank": 64},
        "agent": {"max_steps": max_steps, "max_new_tokens": max_new_tokens, "ftp": True, "ftp_max_new_tokens": 128},
        "retrieval": {"corpus": "bundled:wiki18_sample_1000", "embedder": f"e5:{embedder}", "index_type": "flat"},
        "sandbox": {"pool": {"num_actors": 4}},
        "generate": {"kinds": kinds, "num_workers": 1, "episodes_per_worker": 256, "keep_all_for_smoke": True},
        "sft": {"max_length": 8192, "cot_max_length": 4096},
        "train": {"kinds": kinds, "num_workers": 1, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 4,
                  "strategy": "ddp", "epochs": 1, "effective_batch_size": 8, "micro_batch_size": 4,
                  "max_tokens_per_batch": 16384, "gradient_checkpointing": True, "lr": 2.0e-4,
                  "lora": {"r": 64, "alpha": 128, "dropout": 0.05}},
        "evaluate": {"limit": test_questions, "modes": kinds, "num_workers": 1, "num_gpus": 1,
                     "concurrency": 256},
    }


def submit(head: LocalRayHead, sub_id: str, argv: list[str], timeout: float) -> tuple[str, float, str]:
    t0 = time.monotonic()
    head.ray_cli("job", "submit", f"--address={head.dashboard_url}", f"--submission-id={sub_id}", "--no-wait",
                 "--working-dir", str(REPO), "--runtime-env", "cluster/runtime_env.yaml", "--", *argv,
                 cwd=REPO, check=True, timeout=600)
    status = "?"
    while time.monotonic() - t0 < timeout:
        status = head.api(f"/api/jobs/{sub_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = head.api(f"/api/jobs/{sub_id}/logs")["logs"]
    if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        head.ray_cli("job", "stop", f"--address={head.dashboard_url}", sub_id, cwd=REPO)
    (OUT / f"{sub_id}.log").write_text(logs)
    return status, time.monotonic() - t0, logs


def markdown(result: dict) -> str:
    """The docs/benchmarks.md table for one run (stage seconds from the manifest, job walls, machine load)."""
    rows = [f"| {s} | {r.get('seconds')} |" for s, r in (result.get("stages") or {}).items()]
    first, second = result.get("first", {}), result.get("second", {})
    return "\n".join([
        f"`distill_gpu.py` ({result['mode']}), load average at the end {os.getloadavg()[0]:.1f}, "
        f"{os.cpu_count()} CPUs; versions {json.dumps(result.get('versions'))}", "",
        "| stage | seconds |", "| --- | ---: |", *rows,
        f"| first job (submit to {first.get('status')}) | {first.get('wall_s')} |",
        f"| second job ({second.get('skipped_lines')} stages skipped, {second.get('status')}) | {second.get('wall_s')} |",
        f"| prep (weights, embedder) + head start | {result.get('prep_s')} + {result.get('head_start_s')} |",
        f"| total wall | {result.get('total_wall_s')} |", ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape-dir", default="/tmp/raydistill-bench/qwen2.5-0.5b",
                    help="config + tokenizer of the shape (model_shapes.py; made here when missing)")
    ap.add_argument("--questions", type=int, default=32, help="per training set (2 sets)")
    ap.add_argument("--test-questions", type=int, default=16, help="per test set (2 sets)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-steps", type=int, default=3, help="agent steps per episode")
    ap.add_argument("--cot", action="store_true", help="also the CoT baseline branch (about +2 min on GPU)")
    ap.add_argument("--run-dir", default="/tmp/raydistill-distill-gpu/run")
    ap.add_argument("--cpu", "--cpu-tiny", dest="cpu", action="store_true",
                    help="CPU tiny mode: tests/workflow/tiny.yaml models, same driver, job and e5 retrieval path")
    ap.add_argument("--direct", action="store_true", help="run workflows/distill.py directly, no Ray job")
    ap.add_argument("--write-docs", action="store_true",
                    help="also write $OUT/distill_gpu.md: the stage table for docs/benchmarks.md (re-measure on an "
                         "idle machine)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="per job, seconds (default 480 on GPU: the first job must fit the 7-minute budget)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    # Small random BERT for the e5 embedder path; outside run_dir so a rerun keeps it.
    embedder = tiny_e5_dir(run_dir.parent / "tiny-e5")
    if args.cpu:
        config, gpus = REPO / "tests" / "workflow" / "tiny.yaml", 0
        overrides = [f"run_dir={run_dir}", f"retrieval.embedder=e5:{embedder}"]
        timeout = args.timeout or 1800
    else:
        import yaml

        model = weights_dir(Path(args.shape_dir), Path(args.shape_dir + "-weights"))
        config = OUT / "distill_gpu.yaml"
        config.write_text(yaml.safe_dump(gpu_config(model, embedder, run_dir, args.questions, args.test_questions,
                                                    args.max_new_tokens, args.max_steps, args.cot),
                                         sort_keys=False))
        gpus, overrides = 1, []
        timeout = args.timeout or 480
    prep_s = time.monotonic() - t_start
    argv = [sys.executable, "workflows/distill.py", "--config", str(config), *overrides]
    env = dict(os.environ, **WORKER_ENV, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    result: dict = {"mode": "cpu" if args.cpu else "gpu", "config": str(config), "overrides": overrides,
                    "run_dir": str(run_dir), "embedder": f"e5:{embedder}", "prep_s": round(prep_s, 1)}
    if args.direct:
        for key in ("first", "second"):
            t0 = time.monotonic()
            rc = subprocess.run(argv, env=env, cwd=REPO, timeout=timeout).returncode
            result[key] = {"status": "SUCCEEDED" if rc == 0 else f"rc={rc}", "wall_s": round(time.monotonic() - t0, 1)}
    else:
        t0 = time.monotonic()
        # Its own token (RAY_AUTH_TOKEN in head.env), ports and temp dir; stop() ends only its processes.
        with LocalRayHead(num_gpus=gpus, env=env, log_path=OUT / "distill_gpu_head.log").start(300) as head:
            result["head_start_s"] = round(time.monotonic() - t0, 1)
            for key, sub_id in (("first", "distill-gpu-1"), ("second", "distill-gpu-2")):
                status, wall, logs = submit(head, sub_id, argv, timeout)
                result[key] = {"status": status, "wall_s": round(wall, 1),
                               "skipped_lines": sum("skipped (done for this config" in ln for ln in logs.splitlines())}
                print(f"{sub_id}: {status} in {wall:.0f} s", flush=True)
                if status != "SUCCEEDED":
                    print(logs[-6000:], flush=True)
                    break
    result["total_wall_s"] = round(time.monotonic() - t_start, 1)
    result["driver_cpu_s"] = round(sum(os.times()[:4]), 1)  # this process + reaped children (the head)
    manifest_path = run_dir / "manifest.json"
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        result["stages"] = {s: {"status": r.get("status"), "seconds": r.get("seconds")} for s, r in m["stages"].items()}
        result["jobs"] = [{"status": j.get("status"), "seconds": j.get("seconds"),
                           "stages": j.get("stages")} for j in m["jobs"]]
        result["versions"] = m.get("versions")
        result["cluster"] = m["jobs"][0].get("cluster")
        result["report"] = m.get("report")
        gen = m["stages"].get("generate", {}).get("summary", {})
        result["generate"] = {k: {"episodes": v.get("generation", {}).get("total"), "sft_count": v.get("sft_count"),
                                  "seconds": v.get("seconds")} for k, v in (gen.get("kinds") or {}).items()}
    first_ok = result.get("first", {}).get("status") == "SUCCEEDED"
    ok = first_ok and result.get("second", {}).get("status") == "SUCCEEDED"
    if not args.cpu:
        # The budget: 7 minutes from start (weights + embedder, head start, first job) to a finished run.
        result["within_7_min"] = first_ok and (prep_s + result.get("head_start_s", 0)
                                               + result["first"]["wall_s"]) <= 420
    (OUT / "distill_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    if args.write_docs:
        (OUT / "distill_gpu.md").write_text(markdown(result))
    print("RESULT " + json.dumps(result, default=str), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
