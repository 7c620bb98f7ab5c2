"""Which LLM engine a role (teacher, student) uses and how it is started."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydistill.config.base import Section


class EngineConfig(Section):
    backend: Literal["transformers", "vllm", "openai", "scripted"] = "transformers"
    model: str = "tiny:qwen2-tiny"
    """HF repo id, local checkpoint dir, or `tiny:<name>` (built locally by raydistill.models.tiny)."""
    tokenizer: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(8192, ge=256)
    seed: int = 0
    # vllm
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enable_prefix_caching: bool = True
    load_format: str = "auto"
    """vLLM load format; `dummy` gives random weights of the model's shape (benchmarks)."""
    max_num_seqs: int = Field(256, ge=1)
    lora_adapter: str | None = None
    """PEFT adapter dir applied on top of `model` (vLLM LoRA by name; merged/peft on transformers)."""
    max_lora_rank: int = 64
    # transformers
    max_batch_size: int = Field(16, ge=1)
    """transformers backend: most concurrent requests decoded together in one batch."""
    # openai
    base_url: str | None = None
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (never the key itself)."""
    max_concurrency: int = Field(64, ge=1)
    request_timeout_s: float = 600.0
    max_retries: int = 3
    # resources on Ray
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(0.25, ge=0)
