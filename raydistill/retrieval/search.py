"""Batched retrieval: embed a list of queries in one pass, one faiss call, passages looked up by row.

Why batched: the reference retriever serves one HTTP request per query (embedding a batch of one, then a
search of one); a batch of queries costs little more than one query (benchmarks/retrieval.py measures it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from raydistill.retrieval.corpus import Corpus, read_corpus, text_of, title_of
from raydistill.retrieval.embedders import Embedder, create_embedder
from raydistill.retrieval.index import RefinedIndex, SearchIndex, ShardVectors

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"


@dataclass(frozen=True)
class Hit:
    """One retrieved passage. `row` is its faiss id (position in the corpus)."""

    row: int
    id: str
    contents: str
    score: float

    @property
    def title(self) -> str:
        return title_of(self.contents)

    @property
    def text(self) -> str:
        return text_of(self.contents)

    def to_dict(self) -> dict:
        return asdict(self)


class Retriever:
    """`search(queries, k) -> list[list[Hit]]`, best first; fewer than k hits only if the corpus is smaller."""

    def __init__(self, embedder: Embedder, index: SearchIndex, passages: Corpus, batch_size: int = 256):
        if index.ntotal != len(passages):
            raise ValueError(f"index holds {index.ntotal} vectors but the corpus has {len(passages)} passages")
        if embedder.dim != index.dim:
            raise ValueError(f"embedder {embedder.spec!r} gives {embedder.dim}-d vectors, index is {index.dim}-d")
        self.embedder, self.index, self.passages = embedder, index, passages
        self.batch_size = batch_size

    def search(self, queries: list[str], k: int = 3) -> list[list[Hit]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query in a list")
        if not queries:
            return []
        vecs = self.embedder.encode(list(queries), kind="query", batch_size=self.batch_size)
        return self.search_vectors(vecs, k)

    def search_vectors(self, vecs: np.ndarray, k: int) -> list[list[Hit]]:
        scores, ids = self.index.search(vecs, k)
        out: list[list[Hit]] = []
        for srow, irow in zip(scores, ids, strict=True):
            hits = []
            for s, i in zip(srow.tolist(), irow.tolist(), strict=True):
                if i < 0:
                    continue
                hits.append(Hit(row=int(i), id=self.passages.id(i), contents=self.passages.contents(i),
                                score=float(s)))
            out.append(hits)
        return out

    @classmethod
    def from_index_dir(cls, index_dir: str | Path, *, embedder: Embedder | None = None, device: str | None = None,
                       index_device: str = "cpu", fp16: bool = True, cpu_bf16: bool = False,
                       nprobe: int | None = None,
                       ef_search: int | None = None, refine_factor: int = 0, batch_size: int = 256) -> Retriever:
        """Open what `raydistill index` wrote: meta.json names the corpus and embedder. `refine_factor` > 0
        re-scores an approximate index's top k*factor exactly from the on-disk embedding shards."""
        meta = load_meta(index_dir)
        passages = read_corpus(meta["corpus"])
        if len(passages) != meta["count"]:
            raise ValueError(f"{meta['corpus']} now has {len(passages)} passages; the index in {index_dir} was "
                             f"built over {meta['count']}: rebuild it")
        index = SearchIndex.load(Path(index_dir) / INDEX_FILE, kind=meta["index_type"],
                                 params=meta.get("index_params"))
        index.set_search_params(nprobe, ef_search)
        if refine_factor and index.kind != "flat":
            emb_dir = Path(index_dir) / "embeddings"
            try:
                index = RefinedIndex(index, ShardVectors.from_dir(emb_dir), refine_factor)
            except (FileNotFoundError, ValueError) as e:
                log.warning("no exact re-ranking (%s in %s): searching the %s index alone", e, emb_dir, index.kind)
        index = index.to_device(index_device)
        if embedder is None:
            emb = meta["embedder"]
            embedder = create_embedder(emb["spec"], device=device, fp16=fp16, cpu_bf16=cpu_bf16,
                                       max_length=emb["max_length"], batch_size=batch_size)
        return cls(embedder, index, passages, batch_size=batch_size)


def load_meta(index_dir: str | Path) -> dict:
    path = Path(index_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the index first (`raydistill index --config ...`)")
    return json.loads(path.read_text())
