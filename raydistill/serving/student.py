"""Which student a run serves or evaluates: adapter resolution, a readable label, the model's size."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from raydistill.config.engine import EngineConfig

Kind = Literal["agent", "cot"]


def resolve_adapter(setting: str | None, run_path: Path, kind: Kind, engine: EngineConfig) -> str | None:
    """`auto`: the engine's own `lora_adapter` when set, else the adapter training wrote
    (<run_dir>/train/<kind>/adapter) when present, else None (the base model). None: the base model.
    Any other value is an adapter dir that must exist."""
    if setting == "auto":
        if engine.lora_adapter:
            return engine.lora_adapter
        trained = run_path / "train" / kind / "adapter"
        return str(trained) if (trained / "adapter_config.json").exists() else None
    if setting is None:
        return None
    p = Path(setting).expanduser()
    if not (p / "adapter_config.json").exists():
        raise FileNotFoundError(f"LoRA adapter {setting!r} not found (no adapter_config.json in {p})")
    return str(p.resolve())


def student_engine_cfg(engine: EngineConfig, adapter: str | None) -> EngineConfig:
    return engine.model_copy(update={"lora_adapter": adapter})


def model_label(engine: EngineConfig, adapter: str | None, explicit: str | None = None) -> str:
    """`explicit`, else the model's basename (+ `+lora` when an adapter is applied)."""
    if explicit:
        return explicit
    base = engine.model.rstrip("/").split("/")[-1].removeprefix("tiny:")
    return f"{base}+lora" if adapter else base


_SIZE_RE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")


def model_size_b(model: str) -> float | None:
    """Parameter count in billions: counted from the checkpoint's config (meta device, no weights loaded) when
    it is a local dir, else parsed from the name (`Qwen2.5-1.5B-Instruct` -> 1.5), else None."""
    try:
        from raydistill.models import resolve_model

        path = Path(resolve_model(model))
        if (path / "config.json").exists():
            return round(_count_params(path) / 1e9, 6)
    except Exception:
        pass
    m = _SIZE_RE.search(model.split("/")[-1])
    return float(m.group(1)) if m else None


def _count_params(path: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def adapter_info(adapter: str | None) -> dict:
    if not adapter:
        return {}
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
