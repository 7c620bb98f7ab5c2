"""Real MiniLM over the bundled 1,000-passage wiki-18 sample: title queries find their passage, compressed
indexes agree with exact search at a measured recall, builds are deterministic, and the web_search text."""

from __future__ import annotations

import numpy as np
import pytest

from raydistill.retrieval import (
    Hit,
    Retriever,
    SearchIndex,
    build_index,
    format_web_search,
    make_web_search,
    recall_at_k,
)


def _hit_at(retriever: Retriever, queries: list[str], titles: list[str], k: int) -> float:
    results = retriever.search(queries, k)
    return float(np.mean([any(h.title == t for h in hits[:k]) for hits, t in zip(results, titles, strict=True)]))


# Measured (all 472 titles): title alone hit@1 0.983, "Who is <title>?" 0.985, "What is <title>?" 0.979;
# hit@5 0.998. A query counts as a hit when the top passage carries the title it names (several passages
# share a title).
@pytest.mark.parametrize("template, min_hit1", [("{}", 0.96), ("Who is {}?", 0.96)])
def test_title_queries_retrieve_their_passage_top1(retriever, titles, template, min_hit1):
    queries = [template.format(t) for t in titles]
    hit1 = _hit_at(retriever, queries, titles, 1)
    print(f"{template!r}: hit@1 = {hit1:.3f} over {len(titles)} titles")
    assert len(titles) == 472 and hit1 >= min_hit1


@pytest.fixture(scope="module")
def title_queries(minilm, titles):
    return minilm.encode(titles, "query")


# Measured on the 1,000 MiniLM vectors with the 472 title queries (share of the exact top-10 / top-1 found):
# ivfpq nlist 25 (clamped from 1024), 16 B/vector, nprobe 8: recall@10 0.609, recall@1 0.716 (PQ trained on
# only 1,000 points); hnsw M 32, ef 128: see the printed figure. Exact re-ranking: the next test.
@pytest.mark.parametrize("kind, kw, min_r10, min_r1", [
    ("ivfpq", dict(nlist=1024, pq_m=16, nprobe=8), 0.55, 0.65),
    ("hnsw", dict(), 0.98, 0.98),
])
def test_compressed_index_recall_vs_exact_on_real_embeddings(passage_vecs, flat_index, title_queries, kind, kw,
                                                             min_r10, min_r1):
    _, exact = flat_index.search(title_queries, 10)
    idx = build_index(passage_vecs, kind, **kw)
    _, ids = idx.search(title_queries, 10)
    r10, r1 = recall_at_k(ids, exact, 10), recall_at_k(ids, exact, 1)
    print(f"{kind} {idx.params}: recall@10={r10:.3f} recall@1={r1:.3f}")
    assert r10 >= min_r10 and r1 >= min_r1


def test_ivfpq_with_exact_rerank_from_shards(passage_vecs, flat_index, title_queries, tmp_path):
    """IVF-PQ (16 B/vector in RAM) re-scored from memory-mapped shard files recovers the exact ranking."""
    from raydistill.retrieval.index import RefinedIndex, ShardVectors

    for start in range(0, 1000, 300):
        np.save(tmp_path / f"emb-{start:012d}-{min(start + 300, 1000):012d}.npy", passage_vecs[start:start + 300])
    vectors = ShardVectors.from_dir(tmp_path)
    np.testing.assert_array_equal(vectors.take(np.array([[0, 299], [300, 999]])),
                                  passage_vecs[[[0, 299], [300, 999]]])
    _, exact = flat_index.search(title_queries, 10)
    base = build_index(passage_vecs, "ivfpq", nlist=1024, pq_m=16, nprobe=8)
    _, plain = base.search(title_queries, 10)
    r = {1: recall_at_k(plain, exact, 10)}
    for factor in (4, 10):
        scores, ids = RefinedIndex(base, vectors, factor=factor).search(title_queries, 10)
        r[factor] = recall_at_k(ids, exact, 10)
        np.testing.assert_allclose(scores, np.take_along_axis(title_queries @ passage_vecs.T, ids, 1), atol=1e-5)
    # Measured: recall@10 0.609 -> 0.860 (top 40 re-scored) -> 0.904 (top 100); with nprobe 25: 0.903 / 0.977.
    print(f"ivfpq nprobe 8 recall@10: plain {r[1]:.3f}, re-ranked top 40 {r[4]:.3f}, top 100 {r[10]:.3f}")
    assert r[4] >= 0.82 and r[10] >= 0.88 and r[10] >= r[4] > r[1] + 0.15
    (tmp_path / "emb-000000000300-000000000600.npy").unlink()
    with pytest.raises(ValueError, match="do not tile"):
        ShardVectors.from_dir(tmp_path)


def test_build_is_deterministic(minilm, corpus, passage_vecs, tmp_path):
    """Same passages, same batches -> bit-identical vectors and index files; search results equal."""
    rows = list(range(0, 1000, 21))  # 48 passages across the sample
    texts = [corpus.contents(i) for i in rows]
    a = minilm.encode(texts, "passage", batch_size=16)
    b = minilm.encode(texts, "passage", batch_size=16)
    assert np.array_equal(a, b)
    # The session's (possibly disk-cached) vectors are what this code computes: other batches, last bits only.
    np.testing.assert_allclose(a, passage_vecs[rows], atol=1e-5)
    pa = build_index(passage_vecs, "flat").save(tmp_path / "a.faiss")
    pb = build_index(passage_vecs, "flat").save(tmp_path / "b.faiss")
    assert pa.read_bytes() == pb.read_bytes()
    q = minilm.encode(["Who is Evan Morris?", "Dibba Al-Hisn"], "query")
    assert np.array_equal(SearchIndex.load(pa).search(q, 5)[1], SearchIndex.load(pb).search(q, 5)[1])


def test_retriever_hits_and_limits(retriever, corpus):
    res = retriever.search(["Who is Evan Morris?", "Horatio Hale expedition"], 3)
    assert [len(r) for r in res] == [3, 3]
    top = res[0][0]
    assert isinstance(top, Hit) and (top.id, top.row, top.title) == ("0", 0, "Evan Morris")
    assert top.contents == corpus.contents(0) and top.text.startswith("Evan Morris Evan L. Morris")
    assert res[0][0].score >= res[0][1].score >= res[0][2].score
    assert res[1][0].title == "Horatio Hale"
    assert retriever.search([], 3) == []
    assert len(retriever.search(["x"], 2000)[0]) == 1000  # k beyond the corpus: everything, no padding
    with pytest.raises(TypeError, match="list of queries"):
        retriever.search("Evan Morris", 3)
    with pytest.raises(ValueError, match="index holds 1000 vectors but the corpus has 2"):
        Retriever(retriever.embedder, retriever.index, corpus.from_rows([("a", "b"), ("c", "d")]))


def test_web_search_format(retriever):
    hits = retriever.search(["Who is Evan Morris?"], 3)[0]
    text = format_web_search("Who is Evan Morris?", hits)
    lines = text.split("\n")
    assert lines[0] == "Retrieved documents:"
    heads = [ln for ln in lines if ln.startswith("=====")]
    assert heads == [f"===== Document {i}, similarity: {h.score:.2f} =====" for i, h in enumerate(hits)]
    assert text.index(heads[0]) < text.index(hits[0].contents) < text.index(heads[1])
    assert format_web_search("q", []) == "Retrieved documents:\nNo documents found for this query."

    tool = make_web_search(retriever, k=2)
    out = tool("Horatio Hale")
    assert out.count("===== Document") == 2 and '"Horatio Hale"' in out
    with pytest.raises(TypeError, match="needs a string query"):
        tool(["Horatio Hale"])
    with pytest.raises(ValueError, match="empty query"):
        tool("   ")


def test_service_coalesces_dedups_and_caches(retriever):
    """The coalescing front without Ray: concurrent calls share one batch, identical queries are searched
    once, repeats come from the cache, and each caller gets its own k."""
    import asyncio

    from raydistill.actors.retriever import RetrieverService

    svc = RetrieverService(retriever=retriever, top_k=3, batch_wait_ms=5)

    async def go():
        first = await asyncio.gather(*[svc.search(["Horatio Hale"], 3) for _ in range(8)],
                                     svc.search(["Evan Morris", "Dibba Al-Hisn"], 2))
        s1 = await svc.stats()
        again = await svc.search(["Horatio Hale"], 2)
        s2 = await svc.stats()
        wider = await svc.search(["Horatio Hale"], 5)
        s3 = await svc.stats()
        with pytest.raises(TypeError, match="query 1 is a int"):
            await svc.search(["a", 1])
        return first, again, wider, s1, s2, s3

    first, again, wider, s1, s2, s3 = asyncio.run(go())
    assert (s1["calls"], s1["batches"], s1["queries"], s1["searched"]) == (9, 1, 10, 3)
    assert all(r == first[0] for r in first[:8]) and first[0][0][0].title == "Horatio Hale"
    assert [len(h) for h in first[8]] == [2, 2] and first[8][0][0].title == "Evan Morris"
    assert again == [first[0][0][:2]] and s2["searched"] == 3 and s2["cache_hits"] == 1
    assert len(wider[0]) == 5 and s3["searched"] == 4  # a larger k than cached: searched again
