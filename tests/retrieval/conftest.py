"""Shared, expensive things built once per session: the bundled corpus, real MiniLM, its passage embeddings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from raydistill.data import corpus_path

SAMPLE = "bundled:wiki18_sample_1000"


@pytest.fixture(scope="session")
def sample_path():
    return corpus_path(SAMPLE)


@pytest.fixture(scope="session")
def corpus(sample_path):
    from raydistill.retrieval import read_corpus

    return read_corpus(sample_path)


@pytest.fixture(scope="session")
def minilm():
    from raydistill.retrieval import create_embedder

    return create_embedder("minilm", batch_size=64)


def _cache_key(sample_path) -> str:
    """Everything the vectors depend on: the embedder code, the model weights, the corpus file."""
    from raydistill.retrieval import embedders

    h = hashlib.sha256()
    h.update(Path(embedders.__file__).read_bytes())
    h.update(str(os.path.getsize(embedders.minilm_path() / "model.safetensors")).encode())
    h.update((embedders.minilm_path() / "config.json").read_bytes())
    h.update(Path(sample_path).read_bytes())
    return h.hexdigest()[:20]


@pytest.fixture(scope="session")
def passage_vecs(corpus, minilm, sample_path) -> np.ndarray:
    """All 1,000 sample passages through real MiniLM. The slow part (a minute on 2 idle cores), so it is cached
    on disk keyed by the embedder source, the weights and the corpus; test_quality re-embeds a slice fresh and
    compares, so a stale or wrong cache fails there."""
    cache = Path(os.environ.get("RAYDISTILL_CACHE", Path.home() / ".cache" / "raydistill")) / "test-embeddings"
    path = cache / f"minilm-wiki18-1000-{_cache_key(sample_path)}.npy"
    if path.exists():
        return np.load(path)
    vecs = minilm.encode(corpus.rows()[1], kind="passage")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.save(f, vecs)
    os.replace(tmp, path)
    return vecs


@pytest.fixture(scope="session")
def flat_index(passage_vecs):
    from raydistill.retrieval import build_index

    return build_index(passage_vecs, "flat")


@pytest.fixture(scope="session")
def retriever(minilm, flat_index, corpus):
    from raydistill.retrieval import Retriever

    return Retriever(minilm, flat_index, corpus)


@pytest.fixture(scope="session")
def titles(corpus) -> list[str]:
    return sorted({corpus.title(i) for i in range(len(corpus))})
