"""Packing keeps attention inside each sample; targets/loss see only loss-mask tokens; micro-batching is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from raydistill.train.attention import register, segment_bounds
from raydistill.train.packing import IGNORE, Sample, dummy_micro_batch, loss_sum, pack, pack_row, pad_batches


def _samples(lengths, seed=0, vocab=2000):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        mask = (rng.random(n) < 0.5).astype(np.int8)
        mask[0] = 0
        out.append(Sample(rng.integers(5, vocab, n), mask, key=f"s{i}"))
    return out


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    register()
    return {impl: AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
            for impl in ("eager", "sdpa", "sdpa_varlen")}


def test_targets_are_shifted_per_sample_and_masked():
    s = Sample([10, 11, 12, 13, 14], [0, 0, 1, 1, 0])
    assert s.targets().tolist() == [IGNORE, 12, 13, IGNORE, IGNORE]
    assert s.num_targets == 2
    mb = pack_row([s, Sample([20, 21, 22], [0, 1, 1])])
    # the last token of sample 1 must not learn sample 2's first token
    assert mb.targets[0].tolist() == [IGNORE, 12, 13, IGNORE, IGNORE, 21, 22, IGNORE]
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert mb.cu_seq_lens.tolist() == [0, 5, 8] and mb.max_seq_len == 5 and mb.num_targets == 4


def test_pack_fills_rows_without_losing_or_splitting_samples():
    samples = _samples([300, 200, 120, 500, 90, 60, 511, 10])
    rows = pack(samples, max_tokens=512)
    assert all(r.num_tokens <= 512 for r in rows)
    assert sorted(n for r in rows for n in r.sample_lens) == sorted(len(s) for s in samples)
    assert sum(r.num_targets for r in rows) == sum(s.num_targets for s in samples)
    # as few rows as first-fit decreasing (511 | 500+10 | 300+200 | 120+90+60), then evened out
    assert [r.sample_lens for r in rows] == [[511], [500], [300, 90], [200, 120, 60, 10]]
    # evening out never costs a row: dealing 7,7,6,3,3,2,2 into 3 rows of 10 strands the last 2, so FFD's rows stay
    assert [r.sample_lens for r in pack(_samples([7, 7, 6, 3, 3, 2, 2]), max_tokens=10)] == [[7, 3], [7, 3], [6, 2, 2]]
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        pack(_samples([600]), max_tokens=512)


def test_segment_bounds_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]])
    assert segment_bounds(pos) == [0, 3, 4, 8]
    assert segment_bounds(torch.arange(6)[None]) == [0, 6]


@pytest.mark.parametrize("impl", ["eager", "sdpa", "sdpa_varlen"])
def test_packed_row_logits_equal_unpacked(models, impl):
    model = models[impl]
    samples = _samples([9, 17, 1, 30, 5], seed=1)
    mb = pack_row(samples)
    with torch.no_grad():
        packed = model(**mb.model_inputs("cpu")).logits[0]
        alone = torch.cat([model(input_ids=torch.from_numpy(s.input_ids)[None], use_cache=False).logits[0]
                           for s in samples])
        leaky = model(input_ids=mb.input_ids, use_cache=False).logits[0]  # one long sequence: attention leaks
    assert torch.allclose(packed, alone, atol=1e-4), (packed - alone).abs().max()
    assert (leaky - alone).abs().max() > 1e-2  # the comparison can fail


def test_sdpa_varlen_isolates_from_position_ids_alone(models):
    """The bounds can come as a list (the loop), as flash-style cu_seq_lens tensors, or from position ids alone."""
    samples = _samples([12, 7, 20], seed=2)
    mb = pack_row(samples)
    kw = {"input_ids": mb.input_ids, "position_ids": mb.position_ids, "use_cache": False}
    with torch.no_grad():
        alone = torch.cat([models["sdpa_varlen"](input_ids=torch.from_numpy(s.input_ids)[None]).logits[0]
                           for s in samples])
        for inputs in (kw, mb.model_inputs("cpu", flash=True)):
            assert "packed_seq_bounds" not in inputs
            packed = models["sdpa_varlen"](**inputs).logits[0]
            assert torch.allclose(packed, alone, atol=1e-4)


def test_packed_and_padded_loss_and_grads_equal_per_sample_sum(models):
    model = models["sdpa_varlen"]
    samples = _samples([40, 13, 27, 8], seed=3)
    per_sample = []
    for s in samples:
        model.zero_grad()
        loss = loss_sum(model, pack_row([s]), "cpu")
        loss.backward()
        per_sample.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    ref_loss = sum(x for x, _ in per_sample)
    ref_grads = [sum(g[i] for _, g in per_sample) for i in range(len(per_sample[0][1]))]
    for mbs in (pack(samples, 128), pack(samples, 128, pad_to_multiple_of=16), pad_batches(samples, 3, pad_id=0)):
        model.zero_grad()
        total = sum(loss_sum(model, mb, "cpu") for mb in mbs)
        total.backward()
        assert abs(total.item() - ref_loss) < 1e-3 * ref_loss
        for g, r in zip((p.grad for p in model.parameters()), ref_grads, strict=True):
            assert torch.allclose(g, r, atol=1e-5, rtol=1e-3)
    model.zero_grad()


def test_loss_ignores_tokens_outside_the_mask(models):
    """Loss = CE over exactly the masked tokens: changing unmasked targets changes nothing, masked ones do."""
    model = models["sdpa"]
    ids = np.random.default_rng(4).integers(5, 2000, 24)
    mask = np.zeros(24, dtype=np.int8)
    mask[8:16] = 1  # an assistant turn in the middle; tokens 16.. are an (unmasked) observation
    base = loss_sum(model, pack_row([Sample(ids, mask)]), "cpu").item()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)[None], use_cache=False).logits[0]
    manual = torch.nn.functional.cross_entropy(logits[7:15], torch.from_numpy(ids[8:16]), reduction="sum")
    assert abs(base - manual.item()) < 1e-3
    other = ids.copy()
    other[16:] = (other[16:] + 7) % 2000 + 5  # unmasked tokens after the turn: no influence on masked ones
    assert loss_sum(model, pack_row([Sample(other, mask)]), "cpu").item() == pytest.approx(base, abs=1e-5)
    other[15] = (other[15] + 7) % 2000 + 5  # a masked token: the loss must move
    assert abs(loss_sum(model, pack_row([Sample(other, mask)]), "cpu").item() - base) > 1e-3
    none = loss_sum(model, pack_row([Sample(ids, np.zeros(24, dtype=np.int8))]), "cpu")
    assert none.item() == 0.0


def test_dummy_micro_batch_contributes_zero_loss_but_touches_every_parameter(models):
    model = models["sdpa_varlen"]
    model.zero_grad()
    loss = loss_sum(model, dummy_micro_batch(0), "cpu")
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)
    model.zero_grad()


def test_isolation_check_catches_an_attention_that_leaks_across_samples():
    from transformers import AttentionInterface

    from raydistill.train.attention import check_packed_isolation

    def leaky(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kw):  # plain causal: ignores bounds
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("test_leaky", leaky)
    with pytest.raises(RuntimeError, match="does not keep packed samples apart"):
        check_packed_isolation("test_leaky")
    assert check_packed_isolation("sdpa_varlen") < 1e-3


def test_row_padding_is_a_separate_loss_free_segment(models):
    samples = _samples([9, 17, 5], seed=5)
    mb = pack_row(samples, pad_to_multiple_of=16, pad_id=0)
    assert mb.input_ids.shape[1] == 32 and mb.num_tokens == 31 and mb.padded_tokens == 32
    assert mb.cu_seq_lens.tolist() == [0, 9, 26, 31, 32] and mb.targets[0, 31].item() == IGNORE
    assert mb.num_samples == 3 and mb.sample_lens == [9, 17, 5]
    with torch.no_grad():
        padded = models["sdpa_varlen"](**mb.model_inputs("cpu")).logits[0, :31]
        plain = models["sdpa_varlen"](**pack_row(samples).model_inputs("cpu")).logits[0]
    assert torch.allclose(padded, plain, atol=1e-5)
    assert all(r.padded_tokens % 64 == 0 for r in pack(_samples([300, 200, 120, 500]), 512, 64))
