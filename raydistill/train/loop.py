"""The per-worker LoRA training loop (METHOD.md §4), free of Ray: the stage hands it a `Runtime`.

One optimizer step consumes `effective_batch_size` trajectories in total: each of the W workers takes
`effective_batch_size / W` rows from its data shard, packs them into micro-batches of at most
`max_tokens_per_batch` tokens, and runs them with gradients accumulated locally. The loss is the sum of token
cross-entropies divided by the number of target tokens in the whole global batch (all-reduced before the
step), times W because DDP and DeepSpeed average gradients over workers: every target token weighs the same
however the samples fall into rows, micro-batches and workers. Workers whose batch packs into fewer
micro-batches than their peers' run zero-loss one-token micro-batches, so every worker makes the same
collective calls (ZeRO-2/3 reduce on every backward).

Checkpoints (every `checkpoint_every_steps` and at the end) hold the PEFT adapter, optimizer and scheduler
state (or DeepSpeed's sharded checkpoint), the step/epoch/position, and the metrics history, so a restarted
run continues the step count, the LR schedule and the metrics file where the checkpoint left them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from raydistill.config.ray import MULTICAST_OFF
from raydistill.train.packing import MicroBatch, Sample, dummy_micro_batch, loss_sum, plan_micro_batches

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
DS_TAG = "ds"


@dataclass
class LoopSettings:
    """Everything a worker needs; JSON-able so it crosses process boundaries as a plain dict."""

    model: str
    dataset_rows: int
    strategy: str = "ddp"
    use_gpu: bool = False
    bf16: bool = True
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 2.0
    effective_batch_size: int = 8
    micro_batch_size: int = 1
    packing: bool = True
    max_tokens_per_batch: int = 32_768
    pad_to_multiple_of: int = 1
    max_steps: int | None = None
    checkpoint_every_steps: int = 50
    seed: int = 0
    pad_id: int = 0
    shuffle_buffer: int = 256
    balance: bool = True
    """Re-split each global batch over workers by tokens (see `balance`)."""
    live_metrics_path: str | None = None
    fingerprint: str = ""
    progress: bool = True
    progress_interval_s: float = 5.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopSettings:
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """Step arithmetic shared by the driver (is_done, messages) and the workers."""

    per_worker_batch: int
    rows_per_worker: int
    steps_per_epoch: int
    total_steps: int
    """Length of the LR schedule: `epochs` over the data."""
    run_steps: int
    """Where this run stops: total_steps, or max_steps when smaller."""


def make_plan(s: LoopSettings, world_size: int) -> Plan:
    if s.effective_batch_size % world_size:
        raise ValueError(f"train.effective_batch_size={s.effective_batch_size} is not a multiple of "
                         f"train.num_workers={world_size}; each worker takes an equal share of every batch")
    per_worker = s.effective_batch_size // world_size
    rows_per_worker = s.dataset_rows // world_size
    if rows_per_worker == 0:
        raise ValueError(f"{s.dataset_rows} SFT rows cannot feed {world_size} workers (each needs at least one)")
    steps_per_epoch = math.ceil(rows_per_worker / per_worker)
    total = max(1, math.ceil(s.epochs * steps_per_epoch))
    run = min(total, s.max_steps) if s.max_steps else total
    return Plan(per_worker, rows_per_worker, steps_per_epoch, total, run)


class Runtime(Protocol):
    """What the loop needs from its host (Ray Train in the stage, a plain process in LocalRuntime)."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device

    def iter_rows(self, epoch: int) -> Iterator[dict]: ...
    def checkpoint_dir(self) -> contextlib.AbstractContextManager[str | None]: ...
    def report(self, metrics: dict, checkpoint_dir: str | None, name: str) -> None: ...
    def wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module: ...


class LocalRuntime:
    """Single process, no Ray: rows from a list, checkpoints into `checkpoint_root/<name>` (tests, baselines)."""

    world_size = 1
    rank = 0
    local_rank = 0

    def __init__(self, rows: list[dict], checkpoint_root: str | Path, device: str = "cpu", seed: int = 0):
        self.rows = rows
        self.root = Path(checkpoint_root)
        self.device = torch.device(device)
        self.seed = seed
        self.reports: list[dict] = []

    def iter_rows(self, epoch: int) -> Iterator[dict]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        for i in torch.randperm(len(self.rows), generator=g).tolist():
            yield self.rows[i]

    @contextlib.contextmanager
    def checkpoint_dir(self):
        done = sorted(p for p in self.root.glob("step_*") if (p / STATE_FILE).exists()) if self.root.exists() else []
        yield str(done[-1]) if done else None

    def report(self, metrics: dict, checkpoint_dir: str | None, name: str) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            dest = self.root / name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(checkpoint_dir, dest)

    def wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)


# ---------------------------------------------------------------------------------------------- model
def load_peft_model(s: LoopSettings, device: torch.device):
    """Base model (bf16 on GPU, fp32 on CPU) + LoRA on all linear layers; returns (peft_model, attn impl)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raydistill.models import resolve_model
    from raydistill.train.attention import check_packed_isolation, resolve_attn_implementation

    on_gpu = device.type == "cuda"
    attn = resolve_attn_implementation(s.attn_implementation, on_gpu=on_gpu, packing=s.packing)
    if s.packing:
        check_packed_isolation(attn, device)  # milliseconds; guards against a transformers that ignores packing
    dtype = torch.bfloat16 if (on_gpu and s.bf16) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolve_model(s.model), dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(s.seed)  # identical LoRA init on every worker
    lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=s.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora), attn


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """HF's linear schedule: warm up to the peak LR, then decay linearly to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def deepspeed_config(s: LoopSettings, stage: int, on_gpu: bool) -> dict[str, Any]:
    """ZeRO-2/3 config for a loop that owns accumulation (boundary set per micro-batch, one engine.step)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "overlap_comm": on_gpu, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "bf16": {"enabled": bool(on_gpu and s.bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if s.max_grad_norm > 0:
        cfg["gradient_clipping"] = s.max_grad_norm
    if stage == 3:
        cfg["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False,
                                        stage3_param_persistence_threshold=1e5)
    return cfg


# ---------------------------------------------------------------------------------------------- engine
class _Engine:
    """The strategy-specific parts: forward/backward of one micro-batch, the step, saving and loading."""

    def __init__(self, s: LoopSettings, rt: Runtime, plan: Plan):
        self.s, self.rt = s, rt
        self.device = rt.device
        peft_model, self.attn = load_peft_model(s, self.device)
        self.flash = self.attn.startswith("flash")  # its varlen kernel takes cu_seq_lens on the device
        from raydistill.train.attention import describe

        self.attn_path = describe(self.attn, self.device)  # e.g. sdpa_varlen/torch_varlen (after the probe)
        self.peft_model = peft_model
        self.trainable = [p for p in peft_model.parameters() if p.requires_grad]
        self.vocab_size = int(peft_model.get_input_embeddings().weight.shape[0])
        warmup = math.ceil(s.warmup_ratio * plan.total_steps)
        self.ds = s.strategy in ("zero2", "zero3")
        on_gpu = self.device.type == "cuda"
        if self.ds:
            import deepspeed

            optimizer = torch.optim.AdamW(self.trainable, lr=s.lr, weight_decay=s.weight_decay)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=peft_model, model_parameters=self.trainable, optimizer=optimizer,
                lr_scheduler=lambda opt: linear_schedule(opt, plan.total_steps, warmup),
                config=deepspeed_config(s, 2 if s.strategy == "zero2" else 3, on_gpu))
            self.model = self.engine
        else:
            self.model = rt.wrap_ddp(peft_model)
            self.optimizer = torch.optim.AdamW(self.trainable, lr=s.lr, weight_decay=s.weight_decay,
                                               fused=on_gpu or None)
            self.scheduler = linear_schedule(self.optimizer, plan.total_steps, warmup)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if (on_gpu and s.bf16 and not self.ds)
                         else contextlib.nullcontext())

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def micro_step(self, mb: MicroBatch, scale: float, last: bool) -> torch.Tensor:
        if self.ds:
            self.engine.set_gradient_accumulation_boundary(last)
            loss = loss_sum(self.engine, mb, self.device, self.flash)
            self.engine.backward(loss * scale)
            return loss.detach()
        sync = contextlib.nullcontext() if (last or not hasattr(self.model, "no_sync")) else self.model.no_sync()
        with sync:
            with self.autocast:
                loss = loss_sum(self.model, mb, self.device, self.flash)
            (loss * scale).backward()
        return loss.detach()

    def step(self) -> float:
        """Apply the accumulated gradients; returns the global gradient norm before clipping."""
        if self.ds:
            self.engine.step()  # also steps the LR scheduler and clips (gradient_clipping)
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.s.max_grad_norm if self.s.max_grad_norm > 0
                                              else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, out: Path) -> None:
        """Every rank calls this (DeepSpeed saves collectively); rank 0 writes the adapter."""
        if self.ds:
            self.engine.save_checkpoint(str(out / "deepspeed"), tag=DS_TAG, exclude_frozen_parameters=True)
            gather = contextlib.nullcontext()
            if self.s.strategy == "zero3":
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(self.trainable, modifier_rank=None)
            with gather:
                if self.rt.rank == 0:
                    self.peft_model.save_pretrained(out / ADAPTER_DIR)
            return
        if self.rt.rank == 0:
            self.peft_model.save_pretrained(out / ADAPTER_DIR)
            torch.save(self.optimizer.state_dict(), out / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), out / "scheduler.pt")

    def load(self, ckpt: Path) -> None:
        if self.ds:
            path, _ = self.engine.load_checkpoint(str(ckpt / "deepspeed"), tag=DS_TAG, load_module_strict=False)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load its checkpoint from {ckpt / 'deepspeed'}")
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(ckpt / ADAPTER_DIR / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.peft_model, weights)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint {ckpt} adapter has unexpected keys {result.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))


# ---------------------------------------------------------------------------------------------- loop
def _all_gather(obj: Any, rt: Runtime) -> list[Any]:
    import torch.distributed as dist

    if rt.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def balance(batch: list[Sample], world_size: int) -> list[list[Sample]]:
    """Split a global batch over workers with about equal tokens each (longest first, to the least loaded).

    Each worker reads its own shard, so the samples it happens to hold can differ in total length by a lot
    (agent trajectories span 0.5k-10k tokens); the step then waits for the slowest worker. Every worker sees the
    whole batch (it is small: ids of a few dozen trajectories) and computes the same deterministic split.
    """
    parts: list[list[Sample]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for i in sorted(range(len(batch)), key=lambda i: (-len(batch[i]), i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        parts[r].append(batch[i])
        loads[r] += len(batch[i])
    return parts


def _all_reduce(values: list[float], op: str, device: torch.device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


class _Progress:
    """A tqdm bar on rank 0 (throttled, since Ray forwards each redraw as a log line)."""

    def __init__(self, s: LoopSettings, rt: Runtime, plan: Plan, start: int):
        self.bar = None
        if rt.rank == 0 and s.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=plan.run_steps, initial=start, desc="train", unit="step", file=sys.stderr,
                            mininterval=s.progress_interval_s, dynamic_ncols=False, ncols=100)

    def update(self, m: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", lr=f"{m['lr']:.2e}",
                                 refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _batches(rt: Runtime, epoch: int, skip: int, size: int, vocab_size: int) -> Iterator[list[Sample]]:
    from raydistill.train.data import validate_row

    batch: list[Sample] = []
    for i, row in enumerate(rt.iter_rows(epoch)):
        if i < skip:
            continue
        validate_row(row, vocab_size)  # a bad row fails here, naming it, not as an embedding index error
        batch.append(Sample.from_row(row))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(settings: LoopSettings | dict, rt: Runtime) -> dict:
    """Train; returns the final metrics. Every rank runs this with the same settings."""
    s = settings if isinstance(settings, LoopSettings) else LoopSettings.from_dict(settings)
    plan = make_plan(s, rt.world_size)
    torch.manual_seed(s.seed + rt.rank)
    eng = _Engine(s, rt, plan)
    history: list[dict] = []
    step, epoch, rows_done = 0, 0, 0  # rows_done: rows of the current epoch consumed by all workers together
    with rt.checkpoint_dir() as ckpt:
        if ckpt is not None:
            ckpt_path = Path(ckpt)
            state = json.loads((ckpt_path / STATE_FILE).read_text())
            if s.fingerprint and state.get("fingerprint") not in (None, s.fingerprint):
                raise RuntimeError(f"checkpoint {ckpt} was written by a run with another config "
                                   f"(fingerprint {state.get('fingerprint')} != {s.fingerprint})")
            eng.load(ckpt_path)
            step, epoch, rows_done = int(state["step"]), int(state["epoch"]), int(state["rows_done"])
            mpath = ckpt_path / METRICS_FILE
            if mpath.exists():
                history = [json.loads(x) for x in mpath.read_text().splitlines() if x.strip()]
            history = [m for m in history if m["step"] <= step]
            if rt.rank == 0:
                log.info("resumed from %s at step %d (epoch %d, %d rows into it)", ckpt, step, epoch, rows_done)
    live = Path(s.live_metrics_path) if (s.live_metrics_path and rt.rank == 0) else None
    if live is not None:
        live.parent.mkdir(parents=True, exist_ok=True)
        live.write_text("".join(json.dumps(m) + "\n" for m in history))
    if rt.rank == 0:
        log.info("training %s: %d steps (%d/epoch, schedule %d), %d rows/worker, batch %d = %d workers x %d, "
                 "attention %s, strategy %s", s.model, plan.run_steps - step, plan.steps_per_epoch, plan.total_steps,
                 plan.rows_per_worker, s.effective_batch_size, rt.world_size, plan.per_worker_batch, eng.attn_path,
                 s.strategy)
    progress = _Progress(s, rt, plan, step)
    last: dict = history[-1] if history else {}
    eng.model.train()
    dummy = dummy_micro_batch(s.pad_id)
    saved = step
    while step < plan.run_steps:
        batches = _batches(rt, epoch, rows_done // rt.world_size, plan.per_worker_batch, eng.vocab_size)
        while step < plan.run_steps:
            t0 = time.perf_counter()
            local = next(batches, [])
            shares = _all_gather(local, rt)
            data_s = time.perf_counter() - t0  # reading + sharing the batch, the device idle
            if not all(shares):  # some worker's shard is exhausted: the epoch ends for everyone together
                break
            batch = [x for share in shares for x in share]  # the global batch, in rank order, on every worker
            samples = balance(batch, rt.world_size)[rt.rank] if s.balance else local
            mbs = plan_micro_batches(samples, packing=s.packing, max_tokens=s.max_tokens_per_batch,
                                     micro_batch_size=s.micro_batch_size, pad_id=s.pad_id,
                                     pad_to_multiple_of=s.pad_to_multiple_of)
            (n_max,) = _all_reduce([float(len(mbs))], "max", rt.device)
            global_targets = float(sum(x.num_targets for x in batch))
            scale = rt.world_size / max(global_targets, 1.0)
            lr = eng.lr()
            n_max = int(n_max)
            padded = mbs + [dummy] * (n_max - len(mbs))
            loss_acc = torch.zeros((), dtype=torch.float64, device=rt.device)
            for i, mb in enumerate(padded):
                loss_acc += eng.micro_step(mb, scale, last=i == n_max - 1).double()
            grad_norm = eng.step()
            loss_total, padded_total = _all_reduce(
                [float(loss_acc.item()), float(sum(mb.padded_tokens for mb in mbs))], "sum", rt.device)
            (data_s,) = _all_reduce([data_s], "max", rt.device)
            tokens_total, samples_total = sum(len(x) for x in batch), len(batch)
            dt = time.perf_counter() - t0
            step += 1
            rows_done += int(samples_total)
            epoch_pos = epoch + min(1.0, rows_done / (plan.rows_per_worker * rt.world_size))
            last = {"step": step, "epoch": round(epoch_pos, 4), "loss": loss_total / max(global_targets, 1.0),
                    "grad_norm": grad_norm, "lr": lr, "tokens": int(tokens_total),
                    "loss_tokens": int(global_targets), "samples": int(samples_total),
                    "padded_tokens": int(padded_total), "micro_batches": n_max,
                    "dummy_micro_batches": n_max - len(mbs), "step_time_s": round(dt, 4), "data_s": round(data_s, 4),
                    "tokens_per_s": tokens_total / dt, "tokens_per_s_per_worker": tokens_total / dt / rt.world_size,
                    "attn": eng.attn_path}
            if rt.device.type == "cuda":
                last["max_memory_gb"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 2)
            history.append(last)
            if live is not None:
                with live.open("a") as fh:
                    fh.write(json.dumps(last) + "\n")
            progress.update(last)
            if step % s.checkpoint_every_steps == 0 or step == plan.run_steps:
                _checkpoint(eng, rt, s, plan, step, epoch, rows_done, history, final=step == plan.run_steps)
                saved = step
        else:
            break
        epoch += 1
        rows_done = 0
        if epoch >= math.ceil(s.epochs) and step < plan.run_steps:  # rows ran out before the planned steps
            if rt.rank == 0:
                log.warning("data ran out at step %d of %d; saving the final checkpoint", step, plan.run_steps)
            if saved != step:
                _checkpoint(eng, rt, s, plan, step, epoch, rows_done, history, final=True)
            break
    progress.close()
    return last


def _checkpoint(eng: _Engine, rt: Runtime, s: LoopSettings, plan: Plan, step: int, epoch: int, rows_done: int,
                history: list[dict], final: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"raydistill-ckpt-{step:07d}-r{rt.rank}-"))
    try:
        eng.save(tmp)
        has_files = rt.rank == 0 or any(tmp.iterdir())
        if rt.rank == 0:
            state = {"step": step, "epoch": epoch, "rows_done": rows_done, "total_steps": plan.total_steps,
                     "run_steps": plan.run_steps, "world_size": rt.world_size, "strategy": s.strategy,
                     "fingerprint": s.fingerprint, "final": final, "time": time.time()}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            (tmp / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
        metrics = dict(history[-1]) if history else {"step": step}
        metrics.update(final=final, checkpoint_step=step)
        rt.report(metrics, str(tmp) if has_files else None, f"step_{step:07d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def default_env() -> dict[str, str]:
    """Environment the loop expects: NVLink multicast off (multi-GPU hosts), cuDNN attention not preferred.

    torch puts cuDNN SDPA first on H100/H200/B200 and builds one cuDNN graph per new sequence length (tens to
    hundreds of ms each, forward and backward); training sees new lengths every step. `sdpa_varlen` already
    keeps cuDNN out of its own calls; these variables (read once, at the first SDPA call; the name changed
    between torch releases) do the same for HF's `sdpa` path. Existing values win.
    """
    env = {**MULTICAST_OFF, "TOKENIZERS_PARALLELISM": "false", "TORCH_CUDNN_SDPA_PREFERRED": "0",
           "TORCH_CUDNN_SDPA_DEPRIORITIZED": "1"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return env
