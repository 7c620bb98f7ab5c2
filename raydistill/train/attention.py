"""`sdpa_varlen`: attention that stays inside each packed sample without a dense mask.

A packed row holds several samples back to back with `position_ids` restarting at 0 for each one. HF's `sdpa`
path turns that into a dense (L x L) block-diagonal mask, which pushes SDPA off its flash kernel and spends
O(L^2) on blocks that are masked anyway. FlashAttention-2's varlen kernel is the real fix, but the `flash_attn`
package is not always installed; this function gets the same effect from PyTorch's own SDPA by running one
causal, mask-free SDPA call per sample (so the flash / memory-efficient kernels stay eligible).
"""

from __future__ import annotations

import torch

NAME = "sdpa_varlen"


def segment_bounds(position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                   length: int | None = None) -> list[int]:
    """Sample boundaries [0, b1, ..., L] of a packed row, from cu_seq_lens or from restarting position ids."""
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

    Batches of more than one row (or a 2D padding mask) fall back to one SDPA call with the given mask.
    """
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    if query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
            is_causal=mask is None and query.shape[2] > 1)
        return out.transpose(1, 2).contiguous(), None
    bounds = segment_bounds(kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"), query.shape[2])
    if len(bounds) == 2:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout,
                                                               scale=scaling, is_causal=True)
        return out.transpose(1, 2).contiguous(), None
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


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
