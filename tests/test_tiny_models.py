import hashlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raydistill.models.tiny import ensure_tiny_model


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic_and_loads_via_from_pretrained(tmp_path):
    a = ensure_tiny_model("tiny:qwen2-tiny", root=tmp_path / "a")
    b = ensure_tiny_model("tiny:qwen2-tiny", root=tmp_path / "b")
    assert _digest(a) == _digest(b)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    c = ensure_tiny_model("tiny:qwen2-tiny?seed=1", root=tmp_path / "a")
    assert _digest(c) != _digest(a)
    assert ensure_tiny_model("tiny:qwen2-tiny", root=tmp_path / "a") == a  # cached

    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text  # byte-level BPE round-trips exactly
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or tok.eos_token_id in out[0, ids.shape[1]:].tolist()
