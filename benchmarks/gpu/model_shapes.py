"""Random-weight model directories of real model shapes, for GPU benchmarks (vLLM `load_format="dummy"`).

The GPU machine reaches no model hub, so a benchmark model is a config.json of the real architecture plus a
tokenizer whose vocabulary is exactly the model's (151,936 for Qwen2.5-0.5B): every id that random weights
can sample then decodes, so vLLM's detokenizer, stop strings and our chat templating run as they would with
the real model. The tokenizer is the project's tiny byte-level BPE (Qwen's ChatML template and special
tokens) extended with synthetic merges up to the model's vocabulary size. No weights are written: vLLM's
dummy loader initialises them on the GPU.

    python benchmarks/gpu/model_shapes.py qwen2.5-0.5b /tmp/qwen05b     # or: make_model_dir(...)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-32b": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False),
}


def extend_bpe(tokenizer_json: dict, vocab_size: int) -> dict:
    """Grow a byte-level BPE tokenizer.json to `vocab_size` ids with synthetic merges of existing tokens."""
    tj = json.loads(json.dumps(tokenizer_json))
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    specials = {t["content"] for t in tj.get("added_tokens", [])}
    pair_style = bool(merges) and isinstance(merges[0], list)
    base = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]
    partners = base[:512]
    next_id = max(vocab.values()) + 1
    i = 0
    while next_id < vocab_size:
        left = base[i % len(base)]
        for right in partners:
            if next_id >= vocab_size:
                break
            new = left + right
            if new in vocab or len(new) > 48:
                continue
            vocab[new] = next_id
            merges.append([left, right] if pair_style else f"{left} {right}")
            next_id += 1
        i += 1
        if i > len(base) * 4:
            raise RuntimeError("could not grow the vocabulary (base too small)")
    return tj


def make_model_dir(shape: str, out: str | Path, max_position_embeddings: int = 32768) -> Path:
    """Write config.json + generation_config.json + tokenizer files for `shape` into `out` (idempotent)."""
    from transformers import GenerationConfig, Qwen2Config

    from raydistill.models import resolve_model

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    out = Path(out)
    spec = SHAPES[shape]
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tiny = Path(resolve_model("tiny:qwen2-tiny"))
    tj = extend_bpe(json.loads((tiny / "tokenizer.json").read_text()), spec["vocab_size"])
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, out / f.name)
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    cfg = Qwen2Config(**spec, max_position_embeddings=max_position_embeddings, rope_theta=1e6, rms_norm_eps=1e-6,
                      eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
                      torch_dtype="bfloat16", architectures=["Qwen2ForCausalLM"])
    cfg.save_pretrained(out)
    GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]).save_pretrained(out)
    (out / "benchmark_shape.json").write_text(json.dumps({"shape": shape, **spec}))
    return out


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""All linear layers of a Qwen2 block (peft's `all-linear` minus lm_head); vLLM supports LoRA on each."""


def make_adapter(base_dir: str | Path, out: str | Path, rank: int = 8, device: str | None = None) -> str:
    """A random peft LoRA adapter for the model at `base_dir` (weights built from its config in bf16 on `device`,
    default cuda when there is one; lora_B random too, so the adapter changes outputs); only the adapter is
    saved. Idempotent."""
    out = str(out)
    if Path(out, "adapter_config.json").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = AutoConfig.from_pretrained(str(base_dir))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, init_lora_weights=False,
                      task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(out)
    return out


if __name__ == "__main__":
    d = make_model_dir(sys.argv[1], sys.argv[2])
    print(d)
