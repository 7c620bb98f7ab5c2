"""`sdpa_varlen`: attention that stays inside each packed sample without a dense mask.

A packed row holds several samples back to back with `position_ids` restarting at 0 for each one. HF's `sdpa`
path turns that into a dense (L x L) block-diagonal mask, which pushes SDPA off its flash kernel and spends
O(L^2) on blocks that are masked anyway. FlashAttention-2's varlen kernel is the real fix, but the `flash_attn`
package is not always installed; this function gets the same effect from PyTorch's own SDPA by running one
causal, mask-free SDPA call per sample (so the flash / memory-efficient kernels stay eligible).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

NAME = "sdpa_varlen"


def segment_bounds(position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                   length: int | None = None) -> list[int]:
    """Sample boundaries [0, b1, ..., L] of a packed row, from cu_seq_lens or from restarting position ids.

    Both are device tensors on GPU, so this syncs; the training loop passes `packed_seq_bounds` (a list) instead.
    """
    if cu_seq_lens is not None:
        return [int(x) for x in cu_seq_lens.tolist()]
    if position_ids is None:
        return [0, int(length)]
    pos = position_ids[0] if position_ids.dim() == 2 else position_ids
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    return [0, *(int(s) for s in starts.tolist()), int(pos.shape[0])]


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def sdpa_varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None,
                                  dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """HF attention-interface signature; q/k/v are (batch, heads, seq, dim), returns (batch, seq, heads, dim).

    On CUDA in half precision a packed row goes through PyTorch's varlen FlashAttention in one call per layer
    (when the loop passes `packed_cu_seqlens` and torch has it); otherwise one causal SDPA call per sample.
    Batches of more than one row (or a 2D padding mask) fall back to one SDPA call with the given mask.
    """
    single_row = query.shape[0] == 1 and attention_mask is None and query.shape[2] == key.shape[2]
    bounds = None
    if single_row:
        bounds = kwargs.get("packed_seq_bounds") or segment_bounds(kwargs.get("position_ids"),
                                                                   kwargs.get("cu_seq_lens_q"), query.shape[2])
        cu = kwargs.get("packed_cu_seqlens")
        if cu is not None and len(bounds) > 2 and dropout == 0.0 and _varlen_ok(query):
            max_len = max(e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True))
            return _torch_varlen(query, key, value, cu, max_len, scaling), None
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    if not single_row:
        mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
            is_causal=mask is None and query.shape[2] > 1)
        return out.transpose(1, 2).contiguous(), None
    if len(bounds) == 2:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout,
                                                               scale=scaling, is_causal=True)
        return out.transpose(1, 2).contiguous(), None
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _varlen_fn():
    """PyTorch's own varlen FlashAttention (`torch.nn.attention.varlen`, torch >= 2.9), or None."""
    global _VARLEN
    if _VARLEN is None:
        try:
            import inspect

            from torch.nn.attention.varlen import varlen_attn

            params = inspect.signature(varlen_attn).parameters
            has_window, has_causal = "window_size" in params, "is_causal" in params
            _VARLEN = (varlen_attn, has_window, has_causal) if (has_window or has_causal) else False
        except Exception:
            _VARLEN = False
    return _VARLEN or None


_VARLEN = None


def _varlen_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_fn() is not None


def _torch_varlen(query, key, value, cu: torch.Tensor, max_len: int, scaling: float | None) -> torch.Tensor:
    """One causal varlen FlashAttention call for the whole packed row: (1, H, L, D) in, (1, L, H, D) out.

    (L, H, D) views of the projections are already contiguous; grouped KV heads are repeated in that layout
    (head order as HF's repeat_kv).
    """
    fn, has_window, has_causal = _varlen_fn()
    n_rep = query.shape[1] // key.shape[1]
    q = query[0].transpose(0, 1).contiguous()
    k, v = (t[0].transpose(0, 1).contiguous() for t in (key, value))
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    kw: dict = {"scale": scaling}
    if has_window:
        kw["window_size"] = (-1, 0)  # causal
    elif has_causal:
        kw["is_causal"] = True
    else:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn has neither window_size nor is_causal")
    return fn(q, k, v, cu.to(torch.int32), cu.to(torch.int32), max_len, max_len, **kw).unsqueeze(0)


def register() -> str:
    """Make `attn_implementation="sdpa_varlen"` loadable; idempotent. Returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, sdpa_varlen_attention_forward)
    return NAME


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def resolve_attn_implementation(requested: str, on_gpu: bool, packing: bool) -> str:
    """`auto`: FlashAttention-2 varlen when installed on GPU, else sdpa_varlen for packed rows, else sdpa."""
    if requested == "auto":
        if on_gpu and flash_attn_available():
            return "flash_attention_2"
        requested = NAME if packing else "sdpa"
    if requested == NAME:
        register()
    return requested


def check_packed_isolation(attn: str, device: torch.device | str = "cpu") -> float:
    """Fail fast if `attn` (with this transformers version) lets packed samples attend to each other.

    Runs a one-layer random Qwen2 with the same attention implementation on a packed row and on each sample
    alone; returns the ratio of the packed error to the error of ignoring the boundaries (about 0 when isolated).
    """
    from transformers import AutoModelForCausalLM, Qwen2Config

    from raydistill.train.packing import Sample, pack_row

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the precision training uses
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(device, dtype).eval()
        samples = [Sample(torch.randint(0, 128, (n,)).numpy(), torch.zeros(n, dtype=torch.int8).numpy())
                   for n in (11, 5, 23)]
    mb = pack_row(samples)
    with torch.no_grad():
        try:
            packed = model(**mb.model_inputs(device, flash=attn.startswith("flash"))).logits[0].float()
        except Exception as e:  # PyTorch's varlen kernel refused this GPU/build: use the per-sample SDPA loop
            if attn != NAME or not _varlen_ok(torch.empty(0, device=device, dtype=dtype)):
                raise
            global _VARLEN
            _VARLEN = False
            log.warning("torch varlen attention unavailable here (%s: %s); one SDPA call per sample instead",
                        type(e).__name__, e)
            packed = model(**mb.model_inputs(device)).logits[0].float()
        alone = torch.cat([model(input_ids=torch.from_numpy(s.input_ids)[None].to(device), use_cache=False)
                           .logits[0].float() for s in samples])
        leaky = model(input_ids=mb.input_ids.to(device), use_cache=False).logits[0].float()
    ratio = float((packed - alone).abs().max() / (leaky - alone).abs().max().clamp(min=1e-12))
    if ratio > 0.1:
        import transformers

        raise RuntimeError(f"attn_implementation={attn!r} does not keep packed samples apart with transformers "
                           f"{transformers.__version__} (error ratio {ratio:.2f}); set train.attn_implementation="
                           f"{NAME} or train.packing=false")
    return ratio
