"""Retriever: corpus, embedder, faiss index (METHOD.md §6), and the search service in front of it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydistill.config.base import Section


class RetrievalConfig(Section):
    enabled: bool = True
    corpus: str = "bundled:wiki18_sample_1000"
    """JSONL {"id","contents"} or Parquet path, or `bundled:<name>` for the packaged sample."""
    embedder: str = "minilm"
    """`minilm` (offline packaged all-MiniLM-L6-v2), `e5:<path or hub id>`, `hf:<path>` (mean pooling, no
    prefixes), or `st:<sentence-transformers model>`."""
    index_type: Literal["flat", "ivfpq", "hnsw"] = "flat"
    index_dir: str | None = None
    """Where the index lives; default `<run_dir>/index`."""
    top_k: int = Field(3, ge=1, le=100)
    batch_size: int = Field(256, ge=1)
    """Passages per forward pass when embedding the corpus."""
    shard_size: int = Field(10_000, ge=1)
    """Rows per embedding shard: the unit of resumption (a finished shard is never recomputed)."""
    num_actors: int = Field(1, ge=1)
    """Embedding actors in the index build's actor pool."""
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0, ge=0)
    """Per embedding actor; with GPUs, set num_gpus (e.g. 1) and num_actors to the GPU count."""
    fp16: bool = True
    """Half precision embeddings on GPU (ignored on CPU)."""
    cpu_bf16: bool = False
    """bfloat16 embeddings on CPU (CPUs with AMX / AVX512-BF16): ~2x batched throughput; on the bundled sample
    the top-1 of every title query is unchanged. Off by default (fp32 = the reference's numerics)."""
    max_length: int = Field(256, ge=8)
    """Token limit per passage/query (wiki-18 passages are 100 words, ~150 tokens)."""
    ivf_nlist: int = Field(1024, ge=1)
    pq_m: int = Field(16, ge=1)
    """IVF-PQ bytes per vector (must divide the embedding dim)."""
    pq_nbits: int = Field(8, ge=1, le=16)
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_construction: int = Field(200, ge=8)
    hnsw_ef_search: int = Field(128, ge=1)
    nprobe: int = Field(32, ge=1)
    refine_factor: int = Field(4, ge=0)
    """ivfpq/hnsw search: re-score the top k*refine_factor candidates exactly from the on-disk embedding
    shards (memory-mapped); 0 = off. Ignored for flat."""
    train_size: int = Field(262_144, ge=256)
    """Vectors sampled to train IVF-PQ."""
    # The search service (raydistill.actors.retriever)
    max_batch_size: int = Field(256, ge=1)
    """Most queries one coalesced search batch holds."""
    batch_wait_ms: float = Field(2.0, ge=0)
    """How long the service waits for more concurrent queries before searching a partial batch."""
    cache_size: int = Field(4096, ge=0)
    """Queries whose hits the service keeps (LRU; 0 = off): repeated searches are answered without embedding."""
    server_num_cpus: float = Field(0.5, ge=0)
    server_num_gpus: float = Field(0, ge=0)
    """The retriever actor's resources; with a GPU it embeds queries there and searches a GPU index."""
    index_device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where the service searches: `auto` = a GPU when the actor has one (faiss-gpu, else exact torch)."""
