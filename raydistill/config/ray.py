"""How to reach (or start) the Ray cluster."""

from __future__ import annotations

from pydantic import Field

from raydistill.config.base import Section


class RayConfig(Section):
    address: str | None = None
    """None or "local": start a local Ray on 127.0.0.1; "auto" or ray://...: join a cluster."""
    num_cpus: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    object_store_memory: int | None = None
    include_dashboard: bool = False
