"""The adapter around torch's `varlen_attn`: signatures of torch 2.9 / 2.10-2.11 / 2.12+, probe, fallbacks.

torch's kernel is CUDA-only, so on CPU it is replaced by reference implementations with the upstream
signatures (one causal SDPA call per sample, honouring the arguments exactly as upstream does, e.g. causal only
when `window_size == (-1, 0)` as a tuple). A stub that ignores causality or GQA must be refused by the probe.
"""

from __future__ import annotations

import pytest
import torch

from raydistill.train import attention
from raydistill.train.attention import VarlenKernel, probe_torch_varlen, varlen_candidates


def _ref(q, k, v, cu, causal, scale, gqa):
    if k.shape[1] != q.shape[1]:
        if not gqa:
            raise RuntimeError("number of heads in key/value must equal query")  # as a strict kernel would
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    b = cu.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None],
        is_causal=causal, scale=scale)[0].transpose(0, 1) for s, e in zip(b[:-1], b[1:], strict=True)])


def varlen_v211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    return _ref(query, key, value, cu_seq_q, window_size == (-1, 0), scale, gqa=False)


def varlen_v212(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    return _ref(query, key, value, cu_seq_q, window_size == (-1, 0), scale, gqa=enable_gqa)


def varlen_v29(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _ref(query, key, value, cu_seq_q, is_causal, None, gqa=False)


def varlen_leaky(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    k, v = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    return _ref(query, k, v, torch.tensor([0, query.shape[0]]), True, scale, gqa=False)  # ignores the bounds


def varlen_no_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    return _ref(query, key, value, cu_seq_q, False, scale, gqa=True)


@pytest.mark.parametrize(("fn", "native_gqa"), [(varlen_v211, False), (varlen_v212, True), (varlen_v29, False)])
def test_probe_picks_a_causal_isolating_call_for_each_signature(fn, native_gqa):
    kernel = probe_torch_varlen("cpu", torch.float32, fn=fn)
    assert kernel is not None and kernel.native_gqa is native_gqa


@pytest.mark.parametrize("fn", [varlen_leaky, varlen_no_causal])
def test_probe_refuses_kernels_that_leak_or_cannot_be_causal(fn, caplog):
    assert probe_torch_varlen("cpu", torch.float32, fn=fn) is None
    assert "one SDPA call per sample" in caplog.text


def test_no_causal_argument_means_no_candidates_and_env_switch_disables(monkeypatch):
    assert varlen_candidates(varlen_no_causal) == []
    monkeypatch.setenv(attention.VARLEN_ENV, "0")
    assert probe_torch_varlen("cpu", torch.float32, fn=varlen_v211) is None


@pytest.mark.parametrize("fn", [varlen_v211, varlen_v212, varlen_v29])
def test_packed_row_through_the_kernel_equals_per_sample_attention(fn, monkeypatch):
    """`_torch_varlen` (HF layout in and out, scale incl. a non-default one) equals the per-sample SDPA path."""
    kernel = probe_torch_varlen("cpu", torch.float32, fn=fn)
    monkeypatch.setattr(attention, "_VARLEN", kernel)
    g = torch.Generator().manual_seed(1)
    lens = [7, 19, 3]
    q = torch.randn(1, 4, sum(lens), 32, generator=g)
    k, v = torch.randn(1, 2, sum(lens), 32, generator=g), torch.randn(1, 2, sum(lens), 32, generator=g)
    cu = torch.tensor([0, 7, 26, 29], dtype=torch.int32)
    for scale in (32 ** -0.5, 0.07):
        got = attention._torch_varlen(q, k, v, cu, max(lens), scale)
        want, _ = attention.sdpa_varlen_attention_forward(None, q, k, v, None, scaling=scale,
                                                          packed_seq_bounds=cu.tolist())
        assert got.shape == want.shape == (1, sum(lens), 4, 32)
        assert torch.allclose(got, want, atol=1e-5), (scale, (got - want).abs().max())


def test_kernel_passes_causality_as_a_tuple_window():
    seen = {}

    def spy(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False):
        seen.update(window_size=window_size, scale=scale, enable_gqa=enable_gqa, kv_heads=key.shape[1])
        return query

    x, kv = torch.zeros(4, 4, 8), torch.zeros(4, 2, 8)
    VarlenKernel(spy, frozenset(varlen_candidates(spy)[0].params), native_gqa=True)(
        x, kv, kv, torch.tensor([0, 4]), 4, 0.5)
    assert seen == {"window_size": (-1, 0), "scale": 0.5, "enable_gqa": True, "kv_heads": 2}
    VarlenKernel(spy, frozenset(varlen_candidates(spy)[0].params), native_gqa=False)(
        x, kv, kv, torch.tensor([0, 4]), 4, None)
    assert seen["kv_heads"] == 4 and seen["enable_gqa"] is False and seen["scale"] is None


def test_describe_names_the_path_that_runs(monkeypatch):
    monkeypatch.setattr(attention, "_VARLEN", False)
    assert attention.describe("sdpa_varlen", "cpu") == "sdpa_varlen/sdpa_per_sample"
    assert attention.describe("flash_attention_2", "cpu") == "flash_attention_2"


def test_installed_torch_signature_is_understood():
    """The torch installed here (CPU build) has the module; its signature must map to a causal call."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    cands = varlen_candidates(varlen.varlen_attn)
    assert [c.native_gqa for c in cands] == [True, False]
    assert {"window_size", "is_causal"} & cands[0].params
