"""faiss indexes over L2-normalised vectors with inner-product scores.

- `flat`: exact inner product (`IndexFlatIP`), the paper's choice; 4·dim bytes per passage (wiki-18 + e5: 61 GiB).
- `ivfpq`: inverted lists + product quantisation, `pq_m` bytes per passage; for corpora that do not fit in memory.
  Approximate: recall against `flat` is measured (tests, docs/retrieval.md) and tuned with `nprobe`.
- `hnsw`: graph index over full vectors; faster than flat on CPU at the same memory, approximate (`ef_search`).

GPU: with faiss-gpu and a visible GPU, `to_device("gpu")` clones flat/IVF indexes to all GPUs (fp16 storage);
without faiss-gpu a flat index moves to `TorchFlatIndex`, an exact matmul + top-k on the GPU.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

IndexType = Literal["flat", "ivfpq", "hnsw"]
INDEX_TYPES: tuple[str, ...] = ("flat", "ivfpq", "hnsw")


def _faiss():
    import faiss

    return faiss


def faiss_gpus() -> int:
    """GPUs faiss itself can use (0 with faiss-cpu)."""
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class SearchIndex:
    """A faiss index plus what built it. `search(q, k)` -> (scores (n,k) float32, ids (n,k) int64; -1 = none)."""

    def __init__(self, index, kind: str = "flat", params: dict | None = None):
        self.index = index
        self.kind = kind
        self.params = dict(params or {})
        self.device = "cpu"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_f32(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}), got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if q.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        scores, ids = self.index.search(q, k)
        return scores, ids

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        faiss = _faiss()
        if nprobe is not None and self.kind == "ivfpq":
            try:
                faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
            except RuntimeError:  # a GPU clone: set through the parameter space
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", int(nprobe))
            self.params["nprobe"] = int(nprobe)
        if ef_search is not None and self.kind == "hnsw":
            self.index.hnsw.efSearch = int(ef_search)
            self.params["ef_search"] = int(ef_search)

    def save(self, path: str | Path) -> Path:
        """Atomic write (tmp + rename): a killed build never leaves a truncated index under the final name."""
        if self.device != "cpu":
            raise RuntimeError("save the CPU index (load/build it without to_device)")
        faiss = _faiss()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, kind: str | None = None, params: dict | None = None,
             mmap: bool = False) -> SearchIndex:
        faiss = _faiss()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no faiss index here (run `raydistill index` first)")
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(path), flags)
        if kind is None:
            kind = ("hnsw" if "HNSW" in type(index).__name__ else
                    "ivfpq" if "IVF" in type(index).__name__ else "flat")
        out = cls(index, kind, params)
        out.set_search_params(out.params.get("nprobe"), out.params.get("ef_search"))
        return out

    def to_device(self, device: str = "auto") -> SearchIndex:
        """`cpu`, `gpu` or `auto` (GPU when one is visible). faiss-gpu if present; else exact torch for flat."""
        if device == "cpu":
            return self
        gpu_ok = faiss_gpus() > 0
        if not gpu_ok:
            import torch

            if not torch.cuda.is_available():
                if device == "gpu":
                    raise RuntimeError("to_device('gpu'): no GPU visible")
                return self
            if self.kind != "flat":
                log.warning("faiss-gpu not installed: %s index stays on the CPU", self.kind)
                return self
            log.info("faiss-gpu not installed: exact search through torch on the GPU")
            return TorchFlatIndex.from_faiss(self, device="cuda")
        if self.kind == "hnsw":
            log.warning("faiss has no GPU HNSW: index stays on the CPU")
            return self
        faiss = _faiss()
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True
        co.shard = True
        out = SearchIndex(faiss.index_cpu_to_all_gpus(self.index, co=co), self.kind, self.params)
        out.device = "gpu"
        out.set_search_params(self.params.get("nprobe"))
        return out


class TorchFlatIndex(SearchIndex):
    """Exact inner-product search as a matmul + top-k in torch (GPU exact path when faiss-gpu is absent)."""

    def __init__(self, vectors: np.ndarray, device: str = "cpu", half: bool | None = None,
                 query_chunk: int = 4096, params: dict | None = None):
        import torch

        half = device.startswith("cuda") if half is None else half
        self.dtype = torch.float16 if half else torch.float32
        self.xb = torch.from_numpy(_as_f32(vectors)).to(device=device, dtype=self.dtype)
        self.kind, self.params, self.device = "flat", dict(params or {}), device
        self.query_chunk = query_chunk
        self.index = None

    @classmethod
    def from_faiss(cls, idx: SearchIndex, device: str = "cuda") -> TorchFlatIndex:
        return cls(idx.index.reconstruct_n(0, idx.ntotal), device=device, params=idx.params)

    @property
    def ntotal(self) -> int:
        return int(self.xb.shape[0])

    @property
    def dim(self) -> int:
        return int(self.xb.shape[1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q = _as_f32(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}), got {q.shape}")
        kk = min(k, self.ntotal)
        scores = np.full((q.shape[0], k), -np.inf, np.float32)
        ids = np.full((q.shape[0], k), -1, np.int64)
        with torch.inference_mode():
            for i in range(0, q.shape[0], self.query_chunk):
                qt = torch.from_numpy(q[i:i + self.query_chunk]).to(self.xb.device, self.dtype)
                s, j = torch.topk(qt @ self.xb.T, kk, dim=1)
                scores[i:i + len(qt), :kk] = s.float().cpu().numpy()
                ids[i:i + len(qt), :kk] = j.cpu().numpy()
        return scores, ids

    def set_search_params(self, nprobe=None, ef_search=None) -> None:
        return None

    def save(self, path):
        raise RuntimeError("TorchFlatIndex is a search-time view; save the faiss index")

    def to_device(self, device="auto"):
        return self


class ShardVectors:
    """Row-addressable, memory-mapped view over embedding shard files (`emb-<start>-<end>.npy`): exact vectors
    for re-ranking stay on disk (page cache), not in RAM."""

    def __init__(self, paths: Sequence[str | Path]):
        items = sorted((int(Path(p).stem.split("-")[1]), Path(p)) for p in paths)
        if not items:
            raise FileNotFoundError("no embedding shards given")
        self.starts = np.array([s for s, _ in items], np.int64)
        self.arrays = [np.load(p, mmap_mode="r") for _, p in items]
        self.dim = int(self.arrays[0].shape[1])
        ends = self.starts + np.array([len(a) for a in self.arrays])
        if self.starts[0] != 0 or (ends[:-1] != self.starts[1:]).any():
            raise ValueError("embedding shards do not tile the corpus (a shard is missing)")
        self.ntotal = int(ends[-1])

    @classmethod
    def from_dir(cls, emb_dir: str | Path) -> ShardVectors:
        return cls(sorted(Path(emb_dir).glob("emb-*.npy")))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of `rows` (any shape); -1 rows give zeros."""
        flat = np.asarray(rows, np.int64).ravel()
        out = np.zeros((len(flat), self.dim), np.float32)
        valid = flat >= 0
        which = np.searchsorted(self.starts, flat, side="right") - 1
        for s in np.unique(which[valid]):
            sel = valid & (which == s)
            out[sel] = self.arrays[s][flat[sel] - self.starts[s]]
        return out.reshape(*np.shape(rows), self.dim)


class RefinedIndex(SearchIndex):
    """An approximate index whose top `k * factor` candidates are re-scored exactly from on-disk vectors.
    IVF-PQ keeps `pq_m` bytes per vector in RAM; re-ranking recovers most of the recall it loses."""

    def __init__(self, base: SearchIndex, vectors: ShardVectors, factor: int = 4):
        if vectors.ntotal != base.ntotal or vectors.dim != base.dim:
            raise ValueError(f"shards hold {vectors.ntotal}x{vectors.dim}, index {base.ntotal}x{base.dim}")
        self.base, self.vectors, self.factor = base, vectors, max(1, int(factor))
        self.index, self.kind, self.device = base.index, base.kind, base.device
        self.params = {**base.params, "refine_factor": self.factor}

    @property
    def ntotal(self) -> int:
        return self.base.ntotal

    @property
    def dim(self) -> int:
        return self.base.dim

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_f32(queries)
        _, cand = self.base.search(q, k * self.factor)
        exact = np.einsum("nkd,nd->nk", self.vectors.take(cand), q)
        exact[cand < 0] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(cand, order, axis=1)
        scores = np.take_along_axis(exact, order, axis=1).astype(np.float32)
        return scores, ids

    def set_search_params(self, nprobe=None, ef_search=None) -> None:
        self.base.set_search_params(nprobe, ef_search)

    def save(self, path):
        return self.base.save(path)

    def to_device(self, device="auto"):
        return RefinedIndex(self.base.to_device(device), self.vectors, self.factor)


def effective_params(kind: str, n: int, dim: int, *, nlist: int = 1024, pq_m: int = 16, pq_nbits: int = 8,
                     hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128,
                     nprobe: int = 32) -> dict:
    """The parameters actually used for `n` vectors: IVF needs ~39 training points per list and PQ at least
    2**nbits points, so small corpora get fewer lists/bits (logged), never a faiss crash."""
    if kind not in INDEX_TYPES:
        raise ValueError(f"unknown index type {kind!r}; choose one of {INDEX_TYPES}")
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
    if dim % pq_m:
        divisors = [m for m in range(1, min(dim, 128) + 1) if dim % m == 0]
        raise ValueError(f"pq_m={pq_m} must divide the embedding dim {dim}; choose one of {divisors}")
    nl = max(1, min(nlist, n // 39))
    nbits = max(1, min(pq_nbits, int(math.log2(max(n, 2)))))
    if nl != nlist or nbits != pq_nbits:
        log.warning("ivfpq on %d vectors: nlist %d -> %d, pq_nbits %d -> %d (too few points to train more)",
                    n, nlist, nl, pq_nbits, nbits)
    return {"nlist": nl, "pq_m": pq_m, "pq_nbits": nbits, "nprobe": min(nprobe, nl)}


def _training_sample(chunks: Sequence[np.ndarray], n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.concatenate([_as_f32(c) for c in chunks])
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(n, size=size, replace=False))
    out, base = [], 0
    for c in chunks:
        sel = picks[(picks >= base) & (picks < base + len(c))] - base
        if len(sel):
            out.append(_as_f32(c[sel]))
        base += len(c)
    return np.concatenate(out)


def build_index(chunks: Sequence[np.ndarray] | np.ndarray, kind: str = "flat", *, nlist: int = 1024,
                pq_m: int = 16, pq_nbits: int = 8, hnsw_m: int = 32, ef_construction: int = 200,
                ef_search: int = 128, nprobe: int = 32, train_size: int = 262_144, seed: int = 0) -> SearchIndex:
    """Index vectors given as one array or as chunks (e.g. memory-mapped embedding shards, added one by one so
    the corpus never needs to sit in memory twice). Row order = faiss id order."""
    faiss = _faiss()
    if isinstance(chunks, np.ndarray):
        chunks = [chunks]
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        raise ValueError("build_index: no vectors")
    dim = int(chunks[0].shape[1])
    for c in chunks:
        if c.ndim != 2 or c.shape[1] != dim:
            raise ValueError(f"build_index: chunk of shape {c.shape}, expected (*, {dim})")
    n = sum(len(c) for c in chunks)
    params = effective_params(kind, n, dim, nlist=nlist, pq_m=pq_m, pq_nbits=pq_nbits, hnsw_m=hnsw_m,
                              ef_construction=ef_construction, ef_search=ef_search, nprobe=nprobe)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        # `np`: no polysemous training (unused at search time, and 100x the training cost of the PQ itself)
        index = faiss.index_factory(dim, f"IVF{params['nlist']},PQ{params['pq_m']}x{params['pq_nbits']}np",
                                    faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        for cp in (ivf.cp, ivf.pq.cp):  # deterministic k-means; small corpora were already warned about above
            cp.seed = seed
            cp.min_points_per_centroid = 1
        train = _training_sample(chunks, n, max(train_size, params["nlist"] * 39), seed)
        params["train_size"] = int(len(train))
        index.train(train)
    for c in chunks:
        index.add(_as_f32(c))
    out = SearchIndex(index, kind, params)
    out.set_search_params(params.get("nprobe"), params.get("ef_search"))
    return out


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) for a, e in zip(approx_ids, exact_ids, strict=True)]
    return float(np.mean(hits) / k) if hits else 0.0
