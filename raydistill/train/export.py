"""Final artifacts: the PEFT adapter directory (what vLLM loads as a LoRA) and an optional merged model."""

from __future__ import annotations

import shutil
from pathlib import Path


def install_adapter(src: str | Path, dest: str | Path) -> Path:
    """Copy a checkpoint's adapter dir to `dest` atomically (a half-copied adapter is never visible)."""
    src, dest = Path(src), Path(dest)
    if not (src / "adapter_config.json").exists():
        raise FileNotFoundError(f"{src} holds no PEFT adapter (adapter_config.json missing)")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def merge_adapter(base_model: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Base + LoRA merged into plain weights (with the tokenizer), loadable without peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
