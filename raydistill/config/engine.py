"""Which LLM engine a role (teacher, student) uses and how it is started."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from raydistill.config.base import Section


class EngineConfig(Section):
    backend: str = "transformers"
    """Engine backend: transformers, vllm, openai, scripted - any module `raydistill/engines/<backend>.py`."""
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
    enforce_eager: bool = False
    """vLLM: skip CUDA graph capture (faster start, slower decode)."""
    pin_cpus: bool = True
    """vLLM: the engine core on one CPU and this process (its frontend) on another, taken from the top of the
    node's CPUs per GPU slot (engines/cpu_pinning.py; a 0.5B teacher on a 16-vCPU H200 VM gave 1.05-1.36x
    the tokens/s pinned). Skipped, with a log line, where the node has too few CPUs or with data parallel."""
    engine_kwargs: dict[str, Any] = {}
    """vLLM: extra AsyncEngineArgs fields, passed through verbatim."""
    # transformers
    max_batch_size: int = Field(16, ge=1)
    """transformers backend: most concurrent sequences (requests x n) decoded together in one batch."""
    cpu_threads: int = Field(0, ge=0)
    """transformers backend: torch intra-op threads for generation (0 = torch's default). On a shared, busy
    machine 1 thread can be several times faster than oversubscribed ones."""
    batch_wait_ms: float = Field(2.0, ge=0)
    """transformers backend: how long the batcher waits for more requests before starting a batch."""
    # scripted
    script: list[str] = []
    """scripted backend: the texts to return, in order, cycling (tests and demos)."""
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

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from raydistill.engines.base import available_backends, backend_exists

        if not backend_exists(v):
            known = ', '.join(repr(b) for b in available_backends())
            raise ValueError(f"unknown engine backend {v!r}; available: {known}")
        return v
