"""Model path resolution: real checkpoints pass through; `tiny:<preset>` builds a local tiny model."""

from __future__ import annotations

from pathlib import Path

from raydistill.models.tiny import ensure_tiny_model


def resolve_model(name: str) -> str:
    """Return something `from_pretrained` (and vLLM) can load."""
    if name.startswith("tiny:"):
        return str(ensure_tiny_model(name))
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


__all__ = ["ensure_tiny_model", "resolve_model"]
