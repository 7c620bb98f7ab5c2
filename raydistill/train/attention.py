"""`sdpa_varlen`: attention that stays inside each packed sample without a dense mask.

A packed row holds several samples back to back with `position_ids` restarting at 0 for each one. HF's `sdpa`
path turns that into a dense (L x L) block-diagonal mask, which pushes SDPA off its flash kernel and spends
O(L^2) on blocks that are masked anyway. FlashAttention-2's varlen kernel is the real fix, but the `flash_attn`
package is not always installed. This implementation uses, on CUDA in half precision, PyTorch's own varlen
FlashAttention (`torch.nn.attention.varlen.varlen_attn`, one call per layer for the whole row) when a start-up
probe shows it is causal, isolates samples and has a backward with this torch; otherwise one causal, mask-free
SDPA call per sample, never on cuDNN attention (whose per-shape graph builds cost more than the attention
itself when every step brings new sample lengths).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

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
    (when the loop passes `packed_cu_seqlens` and the start-up probe accepted torch's kernel); otherwise one
    causal SDPA call per sample. Batches of more than one row (or a 2D padding mask) fall back to one SDPA call
    with the given mask.
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
        out = _sdpa(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                    is_causal=mask is None and query.shape[2] > 1)
        return out.transpose(1, 2).contiguous(), None
    if len(bounds) == 2:
        out = _sdpa(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True)
        return out.transpose(1, 2).contiguous(), None
    parts = [_sdpa(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling,
                   is_causal=True)
             for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """SDPA that never picks cuDNN attention on CUDA.

    Recent torch puts cuDNN first on sm90/sm100 (H100/H200/B200). cuDNN builds and caches one execution graph
    per problem shape (sequence length included), and a build costs tens to hundreds of milliseconds of host
    time, forward and backward separately. Packed agent rows present new sample lengths in every step, so each
    step would pay ~2 builds per sample; fixed-length (anchor) data pays them once. FlashAttention /
    memory-efficient attention have no per-shape setup.
    """
    if not (q.is_cuda and AVOID_CUDNN):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


AVOID_CUDNN = True
"""False: let torch pick the SDPA backend (benchmarks/gpu/train_profile.py measures what that costs)."""


# ------------------------------------------------------------------------------ torch.nn.attention.varlen
@dataclass(frozen=True)
class VarlenKernel:
    """How to call this torch's `varlen_attn`, whose signature changed between releases (checked upstream):

    * 2.9:  `varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None)` (no scale);
    * 2.10 (and the stored upstream source after it, so by date 2.11): `..., max_k, *, return_aux=None,
      scale=None, window_size=(-1, -1))`: causal is
      `window_size=(-1, 0)` - compared as a tuple inside varlen_attn, so a list would silently mean
      non-causal; backward via a registered autograd formula;
    * 2.12+: adds `enable_gqa=False` (K/V with fewer heads than Q).
    Inputs are (tokens, heads, head_dim). `native_gqa`: K/V are passed with their own (fewer) heads.
    """

    fn: Callable
    params: frozenset
    native_gqa: bool

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                 scale: float | None) -> torch.Tensor:
        kw: dict = {}
        if "window_size" in self.params:
            kw["window_size"] = (-1, 0)
        if "is_causal" in self.params:
            kw["is_causal"] = True
        if scale is not None:
            if "scale" in self.params:
                kw["scale"] = scale
            elif abs(scale * math.sqrt(q.shape[-1]) - 1.0) > 1e-6:  # no scale argument: fold it into q
                q = q * (scale * math.sqrt(q.shape[-1]))
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:
            if self.native_gqa:
                if "enable_gqa" in self.params:
                    kw["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return self.fn(q, k, v, cu, cu, max_len, max_len, **kw)


_VARLEN: VarlenKernel | bool | None = None
"""None: not probed yet; False: not used (missing, refused by the probe, or RAYDISTILL_TORCH_VARLEN=0)."""
VARLEN_ENV = "RAYDISTILL_TORCH_VARLEN"


def set_torch_varlen(enabled: bool | None) -> None:
    """False: never use torch's varlen kernel (per-sample SDPA instead); None: probe again on next use."""
    global _VARLEN
    _VARLEN = False if enabled is False else None


def _varlen_fn() -> VarlenKernel | None:
    """The probed `VarlenKernel` for the current CUDA device, or None (probes on first use)."""
    global _VARLEN
    if _VARLEN is None:
        _VARLEN = probe_torch_varlen() or False
    return _VARLEN or None


def varlen_candidates(fn: Callable) -> list[VarlenKernel]:
    """The ways to call `fn` worth probing, best first; [] when its signature cannot express causal attention."""
    try:
        params = frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []
    if not ({"window_size", "is_causal"} & params):
        return []
    return [VarlenKernel(fn, params, native_gqa=True), VarlenKernel(fn, params, native_gqa=False)]


def probe_torch_varlen(device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                       fn: Callable | None = None) -> VarlenKernel | None:
    """Find a way to call torch's varlen kernel that is causal, isolates samples, handles GQA and has a backward.

    Each candidate runs forward + backward on a small packed GQA problem and is compared with one causal SDPA
    call per sample; the first that matches wins. Fails soft: returns None and logs why.
    """
    if os.environ.get(VARLEN_ENV, "1").lower() in ("0", "false", "no", "off"):
        log.info("torch varlen attention disabled by %s", VARLEN_ENV)
        return None
    if fn is None:
        try:
            from torch.nn.attention.varlen import varlen_attn as fn
        except Exception as e:
            log.info("torch %s has no torch.nn.attention.varlen (%s); one SDPA call per sample",
                     torch.__version__, e)
            return None
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    candidates = varlen_candidates(fn)
    if not candidates:
        log.warning("torch.nn.attention.varlen.varlen_attn%s cannot express causal attention; one SDPA call per "
                    "sample", _signature(fn))
        return None
    lens, h, h_kv, d = [37, 5, 90, 28], 4, 2, 128
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(sum(lens), n, d, generator=g) for n in (h, h_kv, h_kv))
    grad = torch.randn(sum(lens), h, d, generator=g)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    bounds = cu.tolist()
    scale = d ** -0.5

    def run(call):
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            q, k, v = (t.to(device, dtype).requires_grad_() for t in (q0, k0, v0))
            out = call(q, k, v)
            out.backward(grad.to(device, dtype))
            return [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]

    def reference(q, k, v):
        kr, vr = (t.repeat_interleave(h // h_kv, dim=1) for t in (k, v))
        parts = [torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1)[None], kr[s:e].transpose(0, 1)[None], vr[s:e].transpose(0, 1)[None],
            is_causal=True, scale=scale)[0].transpose(0, 1) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        return torch.cat(parts)

    ref = run(reference)
    reasons = []
    for cand in candidates:
        try:
            got = run(lambda q, k, v, c=cand: c(q, k, v, cu, max(lens), scale))
        except Exception as e:  # the kernel refused this GPU/build/shape
            reasons.append(f"native_gqa={cand.native_gqa}: {type(e).__name__}: {str(e)[:200]}")
            continue
        errs = [float((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) for a, b in zip(got, ref, strict=True)]
        if max(errs) < 0.05:
            log.info("torch varlen attention: %s%s, native GQA %s (probe rel. errors out/dq/dk/dv %s)",
                     getattr(fn, "__name__", fn), _signature(fn), cand.native_gqa, [f"{x:.1e}" for x in errs])
            return cand
        reasons.append(f"native_gqa={cand.native_gqa}: mismatch vs per-sample SDPA (rel. errors out/dq/dk/dv "
                       f"{[round(x, 3) for x in errs]})")
    log.warning("torch varlen attention%s not used (%s); one SDPA call per sample instead", _signature(fn),
                "; ".join(reasons))
    return None


def _signature(fn: Callable) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(?)"


def _varlen_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_fn() is not None


def _torch_varlen(query, key, value, cu: torch.Tensor, max_len: int, scaling: float | None) -> torch.Tensor:
    """One causal varlen FlashAttention call for the whole packed row: (1, H, L, D) in, (1, L, H, D) out."""
    kernel = _varlen_fn()
    q = query[0].transpose(0, 1).contiguous()
    k, v = (t[0].transpose(0, 1).contiguous() for t in (key, value))
    return kernel(q, k, v, cu.to(torch.int32), max_len, scaling).unsqueeze(0)


def describe(attn: str, device: torch.device | str) -> str:
    """What actually runs for `attn` on `device` (for logs and metrics), e.g. `sdpa_varlen/torch_varlen`."""
    device = torch.device(device)
    if attn != NAME:
        return attn
    if device.type == "cuda" and _varlen_fn() is not None:
        return f"{NAME}/torch_varlen" + ("" if _varlen_fn().native_gqa else "+repeat_kv")
    return f"{NAME}/sdpa_per_sample" + ("(no cudnn)" if device.type == "cuda" else "")


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
    For `sdpa_varlen` on CUDA it first probes torch's varlen kernel (`probe_torch_varlen`); if the kernel
    raises or leaks here, it is switched off (warning) and the per-sample SDPA path is checked instead.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config

    from raydistill.train.packing import Sample, pack_row

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the precision training uses
    if attn == NAME and device.type == "cuda":
        with torch.cuda.device(device):
            _varlen_fn()
    cfg = Qwen2Config(vocab_size=128, hidden_size=256, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(device, dtype).eval()
        samples = [Sample(torch.randint(0, 128, (n,)).numpy(), torch.zeros(n, dtype=torch.int8).numpy())
                   for n in (11, 5, 23)]
    mb = pack_row(samples)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.from_numpy(s.input_ids)[None].to(device), use_cache=False)
                           .logits[0].float() for s in samples])
        leaky = model(input_ids=mb.input_ids.to(device), use_cache=False).logits[0].float()

        def ratio() -> float:
            packed = model(**mb.model_inputs(device, flash=attn.startswith("flash"))).logits[0].float()
            return float((packed - alone).abs().max() / (leaky - alone).abs().max().clamp(min=1e-12))

        uses_varlen = attn == NAME and _varlen_ok(torch.empty(0, device=device, dtype=dtype))
        try:
            r = ratio()
        except Exception as e:  # PyTorch's varlen kernel refused this model: use the per-sample SDPA loop
            if not uses_varlen:
                raise
            set_torch_varlen(False)
            log.warning("torch varlen attention failed in the model (%s: %s); one SDPA call per sample instead",
                        type(e).__name__, e)
            r = ratio()
        if r > 0.1 and uses_varlen:
            set_torch_varlen(False)
            log.warning("torch varlen attention leaks across packed samples here (error ratio %.2f); one SDPA "
                        "call per sample instead", r)
            r = ratio()
    if r > 0.1:
        import transformers

        raise RuntimeError(f"attn_implementation={attn!r} does not keep packed samples apart with transformers "
                           f"{transformers.__version__} (error ratio {r:.2f}); set train.attn_implementation="
                           f"{NAME} or train.packing=false")
    return r
