"""Stage `train`: student LoRA training on Ray Train (TorchTrainer), one run per SFT kind.

The SFT Parquet goes through Ray Data (`read_parquet` -> `datasets={"train": ds}`; each worker reads its
`get_dataset_shard("train")`); every worker runs `raydistill.train.loop.run`, with DDP (Ray Train's
`prepare_model`) or DeepSpeed ZeRO-2/3. Checkpoints go through `ray.train.report` to
`RunConfig(storage_path, name)`; Ray Train 2.60 (Train V2) resumes a run that uses the same storage path and
name from its latest checkpoint, so a crashed or stopped `raydistill train` simply runs again. At the end the
final checkpoint's adapter is copied to `<run_dir>/train/<kind>/adapter` (a standard PEFT dir vLLM loads as a
LoRA), beside metrics.jsonl, curve.png and done.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydistill.config import RootConfig
from raydistill.config.loader import ConfigError
from raydistill.train.data import (
    TRAIN_COLUMNS,
    SftDataError,
    SftMeta,
    check_dataset_dir,
    check_model_vocab,
    check_tokenizer,
    parquet_files,
)
from raydistill.train.loop import METRICS_FILE, STATE_FILE, LoopSettings, make_plan

log = logging.getLogger(__name__)

DONE_FILE = "done.json"
CONFIG_FILE = "train_config.json"
# TrainConfig keys that change where or how fast training runs, not what it learns (a resumed run may differ).
_RESOURCE_KEYS = {"data", "kinds", "num_workers", "use_gpu", "gpus_per_worker", "cpus_per_worker", "storage_path",
                  "num_to_keep", "checkpoint_every_steps", "max_failures", "merge", "max_steps",
                  "gradient_checkpointing", "attn_implementation", "packing", "max_tokens_per_batch",
                  "micro_batch_size", "shuffle_buffer", "ingest", "pad_to_multiple_of"}


class TrainError(RuntimeError):
    """Training cannot start or finish; the message says why and what to do."""


@dataclass(frozen=True)
class TrainPaths:
    kind: str
    data: Path
    out: Path
    storage_path: str
    run_name: str

    @property
    def adapter(self) -> Path:
        return self.out / "adapter"

    @property
    def merged(self) -> Path:
        return self.out / "merged"

    @property
    def metrics(self) -> Path:
        return self.out / METRICS_FILE

    @property
    def curve(self) -> Path:
        return self.out / "curve.png"

    @property
    def done(self) -> Path:
        return self.out / DONE_FILE


def train_paths(cfg: RootConfig, kind: str) -> TrainPaths:
    t = cfg.train
    if t.data:
        if len(t.kinds) > 1 and "{kind}" not in t.data:
            raise ConfigError(f"train.data={t.data!r} names one dataset but train.kinds={t.kinds}; "
                              "put '{kind}' in the path or train one kind")
        data = Path(t.data.format(kind=kind)).expanduser().resolve()
    else:
        data = cfg.run_path / "sft" / kind
    out = cfg.run_path / "train" / kind
    if t.storage_path:
        return TrainPaths(kind, data, out, t.storage_path, f"{cfg.run_path.name}-{kind}")
    return TrainPaths(kind, data, out, str(out), "checkpoints")


def fingerprint(cfg: RootConfig, meta: SftMeta) -> str:
    """What the adapter depends on: model, data (meta.json), seed and the learning-relevant train keys."""
    train = {k: v for k, v in cfg.train.model_dump().items() if k not in _RESOURCE_KEYS}
    blob = {"model": cfg.student.model, "tokenizer": cfg.student.tokenizer, "seed": cfg.seed, "train": train,
            "data": meta.__dict__}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _kind_done(cfg: RootConfig, p: TrainPaths) -> bool:
    done = _read_json(p.done)
    if not done or not (p.adapter / "adapter_config.json").exists():
        return False
    try:
        meta = check_dataset_dir(p.data)
    except SftDataError:
        meta = None
    fp = fingerprint(cfg, meta) if meta else done.get("fingerprint")
    return (done.get("fingerprint") == fp and done.get("max_steps") == cfg.train.max_steps
            and (not cfg.train.merge or (p.merged / "config.json").exists()))


def is_done(cfg: RootConfig) -> bool:
    return all(_kind_done(cfg, train_paths(cfg, k)) for k in cfg.train.kinds)


# ------------------------------------------------------------------------------------------- workers
class RayRuntime:
    """The loop's view of a Ray Train worker: rank, device, its data shard, checkpoints, DDP."""

    def __init__(self, s: LoopSettings):
        import ray.train
        import torch

        ctx = ray.train.get_context()
        self.world_size, self.rank, self.local_rank = ctx.get_world_size(), ctx.get_world_rank(), ctx.get_local_rank()
        if s.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.shard = ray.train.get_dataset_shard("train")
        self.seed, self.buffer = s.seed, s.shuffle_buffer

    def iter_rows(self, epoch: int):
        kw: dict[str, Any] = {"batch_size": 32, "batch_format": "numpy", "prefetch_batches": 2}
        if self.buffer:
            kw.update(local_shuffle_buffer_size=self.buffer, local_shuffle_seed=self.seed * 1000 + epoch)
        for batch in self.shard.iter_batches(**kw):
            for i in range(len(batch["input_ids"])):
                yield {k: v[i] for k, v in batch.items()}

    @contextlib.contextmanager
    def checkpoint_dir(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    def wrap_ddp(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy="ddp",
                                             parallel_strategy_kwargs={"find_unused_parameters": False})


def train_loop_per_worker(config: dict) -> None:
    from raydistill.train import loop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop.default_env()
    s = LoopSettings.from_dict(config)
    loop.run(s, RayRuntime(s))


# ------------------------------------------------------------------------------------------- driver
def _check_resources(cfg: RootConfig) -> None:
    import ray

    t = cfg.train
    avail = ray.cluster_resources()
    need_cpu = t.num_workers * t.cpus_per_worker
    have_cpu = avail.get("CPU", 0.0)
    problems = []
    if need_cpu > have_cpu:
        problems.append(f"{need_cpu:g} CPUs ({t.num_workers} workers x train.cpus_per_worker={t.cpus_per_worker:g})"
                        f" but the cluster has {have_cpu:g}")
    if t.use_gpu:
        need_gpu, have_gpu = t.num_workers * t.gpus_per_worker, avail.get("GPU", 0.0)
        if need_gpu > have_gpu:
            problems.append(f"{need_gpu:g} GPUs ({t.num_workers} workers x train.gpus_per_worker="
                            f"{t.gpus_per_worker:g}) but the cluster has {have_gpu:g}")
    if problems:
        max_workers = int(have_cpu // t.cpus_per_worker)
        if t.use_gpu and t.gpus_per_worker:
            max_workers = min(max_workers, int(avail.get("GPU", 0.0) // t.gpus_per_worker))
        raise TrainError(f"train.num_workers={t.num_workers} needs " + "; and ".join(problems) +
                         f". Available: {dict(sorted(avail.items()))}. Lower train.num_workers (at most "
                         f"{max_workers} fit) or the per-worker resources, or add nodes.")


def _check_config(cfg: RootConfig) -> None:
    t = cfg.train
    if t.effective_batch_size % t.num_workers:
        raise ConfigError(f"train.effective_batch_size={t.effective_batch_size} must be a multiple of "
                          f"train.num_workers={t.num_workers} (every worker takes an equal share of each batch)")
    if t.strategy in ("zero2", "zero3"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise TrainError(f"train.strategy={t.strategy} needs DeepSpeed, which is not importable here ({e}); "
                             "install deepspeed (pip install 'raydistill[gpu]') or use train.strategy=ddp") from e
    if t.use_gpu and t.gpus_per_worker <= 0:
        raise ConfigError("train.use_gpu=true needs train.gpus_per_worker > 0")


def _settings(cfg: RootConfig, p: TrainPaths, meta: SftMeta, pad_id: int, fp: str) -> LoopSettings:
    t = cfg.train
    return LoopSettings(
        model=cfg.student.model, dataset_rows=meta.count, strategy=t.strategy, use_gpu=t.use_gpu, bf16=t.bf16,
        attn_implementation=t.attn_implementation, gradient_checkpointing=t.gradient_checkpointing,
        lora_r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
        lora_target_modules=t.lora.target_modules, lr=t.lr, weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio, max_grad_norm=t.max_grad_norm, epochs=t.epochs,
        effective_batch_size=t.effective_batch_size, micro_batch_size=t.micro_batch_size, packing=t.packing,
        max_tokens_per_batch=t.max_tokens_per_batch, pad_to_multiple_of=t.pad_to_multiple_of, max_steps=t.max_steps,
        checkpoint_every_steps=t.checkpoint_every_steps, seed=cfg.seed, pad_id=pad_id,
        shuffle_buffer=t.shuffle_buffer, live_metrics_path=str(p.metrics), fingerprint=fp)


def _prepare(cfg: RootConfig, p: TrainPaths) -> tuple[SftMeta, int, str]:
    """All the checks that can fail before any worker starts: data, tokenizer, model, config, leftovers."""
    from transformers import AutoConfig, AutoTokenizer

    from raydistill.models import resolve_model

    meta = check_dataset_dir(p.data)
    tok_name = cfg.student.tokenizer or cfg.student.model
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(tok_name))
    check_tokenizer(meta, tokenizer, p.data)
    model_cfg = AutoConfig.from_pretrained(resolve_model(cfg.student.model))
    check_model_vocab(getattr(model_cfg, "vocab_size", meta.vocab_size), meta, cfg.student.model)
    import pyarrow.parquet as pq

    longest = max(int(pq.read_table(f, columns=["num_tokens"]).column(0).to_numpy().max(initial=0))
                  for f in parquet_files(p.data))
    if cfg.train.packing and longest > cfg.train.max_tokens_per_batch:
        raise ConfigError(f"the longest SFT sample in {p.data} has {longest} tokens, more than "
                          f"train.max_tokens_per_batch={cfg.train.max_tokens_per_batch}; raise it to >= {longest}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    fp = fingerprint(cfg, meta)
    prev = _read_json(p.out / CONFIG_FILE)
    if prev and prev.get("fingerprint") != fp:
        raise TrainError(f"{p.out} holds training output from another config or dataset (fingerprint "
                         f"{prev.get('fingerprint')} != {fp}); delete {p.out} (and its checkpoints under "
                         f"{p.storage_path}) or use another run_dir")
    return meta, pad_id, fp


def make_trainer(settings: LoopSettings, files: list[str], *, num_workers: int, use_gpu: bool,
                 cpus_per_worker: float, gpus_per_worker: float, storage_path: str, run_name: str,
                 num_to_keep: int = 2, max_failures: int = 0, ingest: str = "read_parquet"):
    """The TorchTrainer for `settings` over SFT Parquet `files` (also used by the benchmarks)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # Ray Data's bars would flood the console; the loop has its own
    # Read once and keep the blocks in the object store (SFT data is small: thousands of rows), so every epoch's
    # streaming split replays memory instead of re-reading Parquet. Fractional CPUs: the training workers hold
    # most CPUs, and whole-CPU read tasks would wait for the rest.
    if ingest == "driver":
        import pyarrow.parquet as pq

        ds = ray.data.from_arrow([pq.read_table(f, columns=list(TRAIN_COLUMNS)) for f in files])
    else:
        ds = ray.data.read_parquet(files, columns=list(TRAIN_COLUMNS), num_cpus=0.25).materialize()
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=settings.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=max_failures)),
        datasets={"train": ds})


def train_kind(cfg: RootConfig, kind: str) -> dict[str, Any]:
    from raydistill.train.export import install_adapter, merge_adapter
    from raydistill.train.plot import plot_curve

    p = train_paths(cfg, kind)
    if _kind_done(cfg, p):
        log.info("train[%s]: done already (%s)", kind, p.adapter)
        return {**_read_json(p.done), "skipped": True}
    meta, pad_id, fp = _prepare(cfg, p)
    _check_config(cfg)
    _check_resources(cfg)
    t = cfg.train
    settings = _settings(cfg, p, meta, pad_id, fp)
    plan = make_plan(settings, t.num_workers)
    p.out.mkdir(parents=True, exist_ok=True)
    (p.out / CONFIG_FILE).write_text(json.dumps({"fingerprint": fp, "data": str(p.data), "plan": plan.__dict__,
                                                 "config": cfg.train.model_dump()}, indent=1, default=str))
    p.done.unlink(missing_ok=True)
    trainer = make_trainer(settings, [str(f) for f in parquet_files(p.data)], num_workers=t.num_workers,
                           use_gpu=t.use_gpu, cpus_per_worker=t.cpus_per_worker, gpus_per_worker=t.gpus_per_worker,
                           storage_path=p.storage_path, run_name=p.run_name, num_to_keep=t.num_to_keep,
                           max_failures=t.max_failures, ingest=t.ingest)
    log.info("train[%s]: %d rows from %s, %d steps planned (%d per epoch), %d workers, strategy %s; "
             "checkpoints in %s/%s", kind, meta.count, p.data, plan.run_steps, plan.steps_per_epoch,
             t.num_workers, t.strategy, p.storage_path, p.run_name)
    t0 = time.time()
    result = trainer.fit()
    elapsed = time.time() - t0
    if result.checkpoint is None:
        raise TrainError(f"train[{kind}]: Ray Train finished without a checkpoint (see the worker logs above)")
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        state = json.loads((d / STATE_FILE).read_text())
        install_adapter(d / "adapter", p.adapter)
        shutil.copyfile(d / METRICS_FILE, p.metrics)
    metrics = [json.loads(x) for x in p.metrics.read_text().splitlines() if x.strip()]
    if metrics:
        plot_curve(metrics, p.curve, title=f"{cfg.student.model} LoRA ({kind})")
    if t.merge:
        from raydistill.models import resolve_model

        merge_adapter(resolve_model(cfg.student.model), p.adapter, p.merged,
                      dtype="bfloat16" if t.bf16 else "float32")
    summary = {
        "kind": kind, "fingerprint": fp, "max_steps": t.max_steps, "steps": state["step"],
        "planned_steps": plan.run_steps, "schedule_steps": plan.total_steps, "final_loss": metrics[-1]["loss"]
        if metrics else None, "first_loss": metrics[0]["loss"] if metrics else None,
        "mean_tokens_per_s": (sum(m["tokens"] for m in metrics) / sum(m["step_time_s"] for m in metrics)
                              if metrics else None),
        "adapter": str(p.adapter), "merged": str(p.merged) if t.merge else None, "metrics": str(p.metrics),
        "curve": str(p.curve), "checkpoint": result.checkpoint.path, "data": str(p.data), "seconds": elapsed,
    }
    p.done.write_text(json.dumps(summary, indent=1))
    return summary


def run(cfg: RootConfig) -> dict[str, Any]:
    from raydistill.stages.ray_init import init_ray

    todo = [k for k in cfg.train.kinds if not _kind_done(cfg, train_paths(cfg, k))]
    for k in todo:  # data, tokenizer and config errors surface before Ray starts
        _prepare(cfg, train_paths(cfg, k))
        _check_config(cfg)
    if todo:
        init_ray(cfg.ray)
    kinds = {k: train_kind(cfg, k) for k in cfg.train.kinds}
    return {"stage": "train", "kinds": kinds,
            "artifacts": {k: {"adapter": v["adapter"], "metrics": v["metrics"], "curve": v["curve"]}
                          for k, v in kinds.items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", action="append", choices=["agent", "cot"],
                        help="train only this SFT kind (repeatable; default: train.kinds)")


def main(cfg: RootConfig, args: argparse.Namespace) -> int:
    if getattr(args, "kind", None):
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"kinds": args.kind})})
    try:
        summary = run(cfg)
    except (TrainError, SftDataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)  # the message says what is wrong and what to do: no traceback
        return 2
    for kind, s in summary["kinds"].items():
        state = "done already" if s.get("skipped") else f"{s['steps']} steps in {s['seconds']:.0f}s"
        print(f"train[{kind}]: {state}; loss {s['first_loss']} -> {s['final_loss']}; adapter {s['adapter']}")
    return 0
