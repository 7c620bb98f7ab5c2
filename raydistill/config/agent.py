"""The agent loop's settings (METHOD.md §1, §2, §5)."""

from __future__ import annotations

from pydantic import Field

from raydistill.config.base import Section


class SagConfig(Section):
    """Self-consistent action generation: N candidates per step, executed, majority-voted."""

    enabled: bool = False
    n: int = Field(8, ge=1, le=64)
    temperature: float = Field(0.4, ge=0)
    top_p: float = Field(0.8, gt=0, le=1)


class AgentConfig(Section):
    max_steps: int = Field(5, ge=1, le=50)
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = ["<end_code>", "Observation:", "Calling tools:"]
    observation_max_chars: int = Field(50_000, ge=100)
    ftp: bool = False
    """First-thought prefix: start the first step with the first paragraph of a CoT answer (teacher only)."""
    ftp_max_new_tokens: int = Field(1024, ge=1)
    sag: SagConfig = SagConfig()
    web_search: bool = True
    """Offer `web_search` to the model when a retriever is configured (retrieval.enabled)."""
