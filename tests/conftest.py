"""Shared fixtures: a real local Ray on 127.0.0.1 sized for a 2-core box, and tiny real checkpoints."""

from __future__ import annotations

import os

# Keep every Ray listener on loopback (ray.init(_node_ip_address=...) alone does not do it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from raydistill.data.loaders import CORPUS_DIR  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """A tiny random-weight Qwen2 checkpoint + trained tokenizer, built once and cached."""
    from raydistill.models import resolve_model

    return resolve_model("tiny:qwen2-tiny")


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster on 127.0.0.1. Actors in tests must ask for fractional CPUs."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
        log_to_driver=True, configure_logging=False,
        runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}},
    )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


# A small real retrieval index (40 passages of the bundled Wikipedia sample, MiniLM, flat faiss) for tests that
# need web_search / RAG passages. Built in-process with the retrieval core (the index stage's own tests cover the
# Ray Data build) into a cache dir keyed by its inputs, so later runs and other test modules reuse it.
PASSAGES = 40
MAX_LENGTH = 128

def _cache_dir() -> Path:
    src = (CORPUS_DIR / "wiki18_sample_1000.jsonl").read_bytes()
    key = hashlib.sha256(src + f"{PASSAGES}:{MAX_LENGTH}:minilm:flat:v1".encode()).hexdigest()[:16]
    root = Path(os.environ.get("RAYDISTILL_CACHE", Path.home() / ".cache" / "raydistill"))
    return root / "test-index" / key


def build_small_index() -> list[str]:
    """Build (or reuse) the index; return the overrides that point a config at it."""
    final = _cache_dir()
    if not (final / "index" / "meta.json").exists():
        from raydistill.retrieval import build_index, create_embedder, read_corpus, text_of

        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent))
        corpus = final / "corpus.jsonl"  # meta.json names the final location
        with open(CORPUS_DIR / "wiki18_sample_1000.jsonl") as src:
            (tmp / "corpus.jsonl").write_text("".join(itertools.islice(src, PASSAGES)))
        passages = read_corpus(tmp / "corpus.jsonl")
        emb = create_embedder("minilm", device="cpu", max_length=MAX_LENGTH)
        vecs = emb.encode([text_of(passages.contents(i)) for i in range(len(passages))], kind="passage")
        index = build_index(vecs, "flat")
        (tmp / "index").mkdir()
        index.save(tmp / "index" / "index.faiss")
        meta = {"corpus": str(corpus), "count": len(passages), "dim": int(vecs.shape[1]), "index_type": "flat",
                "index_params": index.params, "embedder": {"spec": "minilm", "max_length": MAX_LENGTH}}
        (tmp / "index" / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, final)  # atomic: concurrent builders race safely, the loser's copy is dropped
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return [f"retrieval.corpus={final / 'corpus.jsonl'}", f"retrieval.index_dir={final / 'index'}",
            f"retrieval.max_length={MAX_LENGTH}", "retrieval.server_num_cpus=0.1", "retrieval.top_k=2"]


@pytest.fixture(scope="session")
def small_index() -> list[str]:
    return build_small_index()
