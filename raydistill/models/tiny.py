"""Tiny random-weight Qwen2 models with a locally trained byte-level BPE tokenizer.

Tests and the local config need real checkpoints without a model hub. The factory trains a tokenizer on the
bundled text, builds a Qwen2-architecture causal LM with random weights, and saves both with
`save_pretrained`, so everything downstream loads them through the ordinary `from_pretrained` path.
Built once per (preset, seed) into a cache dir, atomically, so concurrent Ray workers can race safely.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from raydistill.data.loaders import BENCHMARK_DIR, CORPUS_DIR

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Same roles and layout as Qwen2.5's ChatML template (system/user/assistant, <|im_start|>role\n...<|im_end|>\n),
# including `continue_final_message` support through the standard transformers flag.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 2048
    max_position_embeddings: int = 8192
    seed: int = 0


PRESETS: dict[str, TinySpec] = {
    "qwen2-tiny": TinySpec(),
    "qwen2-small": TinySpec(hidden_size=128, num_hidden_layers=4, intermediate_size=256, vocab_size=4096),
}
TOKENIZER_CORPUS_VERSION = "1"


def cache_root() -> Path:
    return Path(os.environ.get("RAYDISTILL_CACHE", Path.home() / ".cache" / "raydistill")) / "tiny"


def parse_tiny_name(name: str) -> TinySpec:
    """`tiny:qwen2-tiny` or `tiny:qwen2-tiny?seed=3`."""
    body = name.removeprefix("tiny:")
    preset, _, query = body.partition("?")
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model {preset!r}; presets: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    if query:
        kv = dict(item.split("=", 1) for item in query.split("&"))
        spec = TinySpec(**{**asdict(spec), **{k: int(v) for k, v in kv.items()}})
    return spec


def _training_text() -> list[str]:
    texts: list[str] = []
    for f in sorted(BENCHMARK_DIR.glob("*/*.json")):
        for ex in json.loads(f.read_text())["examples"]:
            texts.append(str(ex.get("question", "")))
            texts.append(str(ex.get("answer", "")))
    with (CORPUS_DIR / "wiki18_sample_1000.jsonl").open() as fh:
        texts.extend(json.loads(line)["contents"] for line in fh)
    texts += [
        "Thought: I will compute it.\n```py\nresult = sum(range(10))\nprint(result)\nfinal_answer(result)\n```<end_code>",
        "Observation:\nExecution logs:\n45\nLast output from code snippet:\nNone",
        "import math\nimport numpy as np\nimport sympy as sp\nx = sp.symbols('x')\nweb_search(query=\"capital\")",
        "<answer>\\boxed{42}</answer>",
    ] * 50
    return texts


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the bundled text, with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 32768
    return fast


def build_model(spec: TinySpec, tokenizer):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
    )
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    return model


def spec_key(spec: TinySpec) -> str:
    blob = json.dumps({**asdict(spec), "corpus": TOKENIZER_CORPUS_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_tiny_model(name: str = "tiny:qwen2-tiny", root: Path | None = None) -> Path:
    """Build (once) and return the checkpoint dir of a tiny model; safe against concurrent builders."""
    spec = parse_tiny_name(name)
    root = Path(root) if root else cache_root()
    target = root / f"{name.removeprefix('tiny:').partition('?')[0]}-{spec_key(spec)}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        tokenizer = build_tokenizer(spec.vocab_size)
        model = build_model(spec, tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
