"""Retrieval core (no Ray): embedders, corpora, faiss indexes, batched search, the web_search tool text.

Heavy libraries (torch, transformers, faiss) load on first use, not on `import raydistill.retrieval`.
"""

from pathlib import Path

from raydistill.retrieval.corpus import Corpus, CorpusError, read_corpus, text_of, title_of
from raydistill.retrieval.embedders import Embedder, create_embedder
from raydistill.retrieval.index import SearchIndex, TorchFlatIndex, build_index, recall_at_k
from raydistill.retrieval.search import Hit, Retriever, load_meta
from raydistill.retrieval.tool import format_web_search, make_web_search

__all__ = [
    "Corpus", "CorpusError", "Embedder", "Hit", "Retriever", "SearchIndex", "TorchFlatIndex", "build_index",
    "create_embedder", "format_web_search", "load_meta", "make_web_search", "read_corpus", "recall_at_k",
    "resolve_index_dir", "text_of", "title_of",
]


def resolve_index_dir(cfg) -> Path:
    """`cfg.retrieval.index_dir`, or `<run_dir>/index` when unset (cfg: RootConfig)."""
    if cfg.retrieval.index_dir:
        return Path(cfg.retrieval.index_dir).expanduser().resolve()
    return cfg.run_path / "index"
