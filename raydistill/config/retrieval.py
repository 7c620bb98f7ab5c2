"""Retriever: corpus, embedder, faiss index (METHOD.md §6)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydistill.config.base import Section


class RetrievalConfig(Section):
    enabled: bool = True
    corpus: str = "bundled:wiki18_sample_1000"
    """JSONL {"id","contents"} or Parquet path, or `bundled:<name>` for the packaged sample."""
    embedder: str = "minilm"
    """`minilm` (offline packaged all-MiniLM-L6-v2), `e5:<path or hub id>`, or `st:<sentence-transformers model>`."""
    index_type: Literal["flat", "ivfpq", "hnsw"] = "flat"
    index_dir: str | None = None
    """Where the index lives; default `<run_dir>/index`."""
    top_k: int = Field(3, ge=1, le=100)
    batch_size: int = Field(256, ge=1)
    shard_size: int = Field(10_000, ge=1)
    num_actors: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0, ge=0)
    fp16: bool = True
    """Half precision embeddings on GPU (ignored on CPU)."""
    ivf_nlist: int = Field(1024, ge=1)
    pq_m: int = Field(16, ge=1)
    hnsw_m: int = Field(32, ge=4)
    nprobe: int = Field(32, ge=1)
