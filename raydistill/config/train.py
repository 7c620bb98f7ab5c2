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
    bf16: bool = True
    """bf16 on GPU; CPU runs use float32."""
    gradient_checkpointing: bool = False
    packing: bool = True
    max_tokens_per_batch: int = Field(16_384, ge=64)
    lora: LoraConfig = LoraConfig()
    storage_path: str | None = None
    """Checkpoint storage (local dir or cloud URI); default `<run_dir>/train`."""
    num_to_keep: int = Field(2, ge=1)
    checkpoint_every_steps: int = Field(50, ge=1)
    merge: bool = False
    max_steps: int | None = Field(None, ge=1)
