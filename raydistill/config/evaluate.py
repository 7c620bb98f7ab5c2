"""Evaluation over the benchmark sets and the report (METHOD.md §6)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydistill.config.base import Section

Mode = Literal["agent", "agent_sag", "cot", "rag_cot"]


class EvaluateConfig(Section):
    sets: list[str] | None = None
    """Default: data.test_sets."""
    limit: int | None = Field(None, ge=1)
    """Questions per set (first N); default data.limit."""
    modes: list[Mode] = ["agent"]
    """agent / agent_sag: the agent-distilled student without / with sag; cot / rag_cot: the CoT-distilled
    baseline student, plain or with retrieved passages prepended."""
    agent_adapter: str | None = "auto"
    """LoRA adapter for the agent modes. `auto`: student.lora_adapter when set, else
    <run_dir>/train/agent/adapter when it exists, else the base model. None: the base model."""
    cot_adapter: str | None = "auto"
    """Same for the CoT modes (<run_dir>/train/cot/adapter)."""
    model_label: str | None = None
    """Name of the student in results and report; default: the student model's basename."""
    model_size_b: float | None = Field(None, gt=0)
    """Student size in billions of parameters for the accuracy-vs-size plot; default: counted from the
    model config (or parsed from a name like `...-1.5B-...`)."""
    cot_max_new_tokens: int | None = Field(None, ge=1)
    """Token budget of one CoT answer (cot / rag_cot); None: generate.cot_max_new_tokens, else
    agent.max_new_tokens."""
    endpoint: str | None = None
    """Evaluate against a running Serve endpoint (base URL, e.g. http://127.0.0.1:8000) instead of offline
    engines. Agent modes call /v1/solve; CoT modes call its /v1/chat/completions."""
    endpoint_api_key_env: str | None = None
    request_timeout_s: float = Field(900, gt=0)
    judge_base_url: str | None = None
    """OpenAI-compatible endpoint for the optional LLM judge on QA (METHOD.md §3); EM/F1 are always computed."""
    judge_model: str | None = None
    judge_api_key_env: str | None = None
    num_workers: int = Field(1, ge=1)
    """Evaluation actors (each holds one student engine) in the Ray Data actor pool."""
    num_cpus: float = Field(0.25, ge=0)
    """CPUs per evaluation actor (fractional: it mostly waits on the engine and sandboxes)."""
    num_gpus: float | None = Field(None, ge=0)
    """GPUs per evaluation actor; default student.num_gpus."""
    batch_size: int = Field(32, ge=1)
    """Questions per Ray Data batch; each finished batch is written as one Parquet part (resume unit)."""
    concurrency: int = Field(32, ge=1)
    """Concurrent episodes per actor (or concurrent requests against an endpoint)."""
    compare_runs: list[str] = []
    """Other run dirs whose <run_dir>/eval results are added to the report (accuracy vs model size)."""
    examples_per_group: int = Field(2, ge=0)
    """Example trajectories written (and linked) per (model, mode): one correct and one wrong when possible."""
