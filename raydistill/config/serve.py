"""Ray Serve student endpoint."""

from __future__ import annotations

from pydantic import Field

from raydistill.config.base import Section


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    api_key_env: str | None = None
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_request_bytes: int = Field(64_000, ge=1024)
    max_steps_limit: int = Field(10, ge=1)
    request_timeout_s: float = Field(600, gt=0)
    num_cpus: float = Field(0.25, ge=0)
