"""Student LoRA training on Ray Train (METHOD.md §4)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydistill.config.base import Section


class LoraConfig(Section):
    r: int = Field(64, ge=1)
    alpha: int = Field(128, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainConfig(Section):
    data: str | None = None
    """SFT dataset dir; default `<run_dir>/sft/<kind>`."""
    kinds: list[Literal["agent", "cot"]] = ["agent"]
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    strategy: Literal["ddp", "zero2", "zero3"] = "ddp"
    epochs: float = Field(2, gt=0)
    effective_batch_size: int = Field(8, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = 0.0
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient-norm clipping; 0 turns it off."""
    bf16: bool = True
    """bf16 on GPU; CPU runs use float32."""
    gradient_checkpointing: bool = False
    packing: bool = True
    """Pack samples into rows of <= max_tokens_per_batch tokens (attention kept inside each sample);
    off: length-sorted micro-batches of micro_batch_size samples, padded."""
    max_tokens_per_batch: int = Field(32_768, ge=64)
    """Packed row length per micro-batch (per worker); must be >= the longest SFT sample. Every micro-batch costs
    ~0.4 s of host time (LoRA layers, recompute, backward), so fewer, fuller rows are faster: on an H200 a 1.5B
    student (ZeRO-2, 1 GPU) trained 1.09x faster with 32768 than with 16384 (docs/benchmarks.md, Training).
    Lower it when activations or logits do not fit (7B without ZeRO-3)."""
    pad_to_multiple_of: int = Field(64, ge=1)
    """Packed rows are padded (a separate, loss-free pad segment) up to a multiple of this many tokens, so GPU
    kernels see aligned shapes; costs < this many tokens per row."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa_varlen", "sdpa", "flex_attention", "eager"] = "auto"
    """auto: flash_attention_2 (varlen) on GPU when flash_attn is installed, else sdpa_varlen (one SDPA call per
    packed sample), or sdpa without packing."""
    ingest: Literal["read_parquet", "driver"] = "read_parquet"
    """How the SFT Parquet enters Ray Data: `ray.data.read_parquet` (distributed read tasks), or read by the driver
    with pyarrow and handed over with `ray.data.from_arrow` (no read tasks: quicker for small data on busy
    machines). Either way the blocks are materialised once and every epoch streams them to the workers."""
    shuffle_buffer: int = Field(256, ge=0)
    """Rows in each worker's local shuffle buffer (per-epoch seed); 0 keeps file order."""
    lora: LoraConfig = LoraConfig()
    storage_path: str | None = None
    """Checkpoint storage (local dir or what Ray Train accepts, e.g. s3://...); default `<run_dir>/train/<kind>`
    (checkpoints in its `checkpoints/`); with a custom path each kind gets `<run_dir name>-<kind>/` under it."""
    num_to_keep: int = Field(2, ge=1)
    checkpoint_every_steps: int = Field(50, ge=1)
    max_failures: int = Field(0, ge=-1)
    """Ray Train worker-group restarts (from the last checkpoint) before giving up; -1 = unlimited."""
    merge: bool = False
    """Also write `<run_dir>/train/<kind>/merged`: base + adapter merged into plain weights."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps; the LR schedule still spans `epochs` (so a later run with a higher
    cap resumes on the same schedule)."""
