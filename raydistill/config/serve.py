"""Ray Serve student endpoint: HTTP binding, limits, autoscaling of the ingress and the student engine."""

from __future__ import annotations

from pydantic import Field

from raydistill.config.base import Section


class ServeConfig(Section):
    host: str = "127.0.0.1"
    """Where the HTTP proxy listens; loopback unless set otherwise (e.g. 0.0.0.0 behind a cluster ingress)."""
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    app_name: str = "raydistill"
    adapter: str | None = "auto"
    """Agent LoRA adapter to serve. `auto`: student.lora_adapter when set, else <run_dir>/train/agent/adapter
    when it exists, else the base model. None: the base model."""
    api_key_env: str | None = None
    """Name of the env var holding the API key; requests then need `Authorization: Bearer <key>`."""
    # ingress (FastAPI, runs episodes) autoscaling
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    """CPUs per ingress replica (fractional is fine: it mostly awaits the engine and sandboxes)."""
    # student engine deployment autoscaling (receives every step's generate call of every episode)
    engine_min_replicas: int = Field(1, ge=0)
    engine_max_replicas: int = Field(1, ge=1)
    engine_target_ongoing_requests: float = Field(64, gt=0)
    engine_max_ongoing_requests: int = Field(256, ge=1)
    # limits
    max_request_bytes: int = Field(64_000, ge=1024)
    max_steps_limit: int = Field(10, ge=1)
    max_sag_n: int = Field(16, ge=1)
    max_new_tokens_limit: int = Field(4096, ge=1)
    """Upper bound on per-step / per-completion new tokens a request may ask for."""
    max_question_chars: int = Field(20_000, ge=1)
    request_timeout_s: float = Field(600, gt=0)
    """Per-request time limit: a solve past it is cancelled and answered 504."""
    engine_factory: str | None = None
    """`module:function` taking the student EngineConfig and returning an Engine, used instead of
    `create_engine` in the engine deployment (benchmarks wrap the engine in fixed-action mode)."""
    blocking: bool = True
    """`raydistill serve` keeps running until interrupted (False: deploy and return)."""
