"""`raydistill index`: embed the corpus with a Ray Data actor pool, write embedding shards, build the faiss index.

Pipeline (Ray Data, streaming):
  shard specs (row ranges of the corpus, deterministic) --from_items-->
  read chunks (tasks pinned to the driver's node, where the corpus file is) --map_batches-->
  embed chunks (actor pool: `retrieval.num_actors` actors, fractional CPUs, GPUs when asked) --map_batches-->
  the driver assembles chunks into shards and writes each one atomically as soon as it is complete.

Why chunks of exactly `batch_size` rows as the unit: a chunk is embedded alone (its micro-batches depend on its
texts only) whatever way Ray Data bundles blocks, so embeddings do not depend on scheduling and a rebuild is bit-identical (same hardware, same
batch_size). batch_size is not part of the shard fingerprint: a resumed job may use another one (vectors then
differ in the last float bits only).
Why shards written by the driver: the faiss index is built on this node from all vectors anyway, and it keeps
the run correct on a multi-node cluster without a shared filesystem.
Resumable: a shard file exists only once complete (tmp + rename) and is named by its row range; a rerun
embeds only the shards that are missing or invalid. `embeddings/meta.json` fingerprints what shapes the vectors
(corpus content, embedder, max_length, precision, shard size); a different fingerprint starts the shards over.

Layout of the index dir: embeddings/{meta.json, plan.json, emb-<start>-<end>.npy}, index.faiss, meta.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from raydistill.config import RootConfig
from raydistill.retrieval import resolve_index_dir
from raydistill.retrieval.corpus import Shard, fingerprint_file, plan_shards, read_shard, resolve_corpus
from raydistill.retrieval.embedders import precision
from raydistill.retrieval.index import build_index
from raydistill.retrieval.search import INDEX_FILE, META_FILE
from raydistill.stages.ray_init import init_ray

log = logging.getLogger(__name__)

EMB_DIR = "embeddings"


# ------------------------------------------------------------------------------------------- fingerprints
def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# Every `retrieval.*` key is classified here; tests/retrieval/test_index_fingerprint.py fails on a key that is not,
# so a new setting cannot silently escape the fingerprints (a changed setting must rebuild what it shapes).
EMBEDDING_KEYS = ("embedder", "max_length", "shard_size", "fp16", "cpu_bf16", "num_gpus")
"""Shape the vectors (fp16 / cpu_bf16 / num_gpus through the precision they select)."""
INDEX_KEYS = {"flat": (), "ivfpq": ("ivf_nlist", "pq_m", "pq_nbits", "train_size"),
              "hnsw": ("hnsw_m", "hnsw_ef_construction")}
"""Shape index.faiss for that index type (plus `index_type` itself and, for ivfpq, the root `seed`)."""
NOT_BUILD_KEYS = {
    "enabled": "whether the job uses retrieval at all",
    "corpus": "enters through the corpus content fingerprint (size + first/last MiB), not the path",
    "index_type": "part of the index identity itself",
    "index_dir": "where the index lives, not what it holds",
    "top_k": "search time",
    "batch_size": "rows per forward pass: vectors differ in the last float bits only (docs/retrieval.md)",
    "num_actors": "build parallelism", "num_cpus": "build resources",
    "hnsw_ef_search": "search time: applied when the index is loaded (start_retriever passes it)",
    "nprobe": "search time: applied when the index is loaded (start_retriever passes it)",
    "refine_factor": "search time: re-ranking from the shards",
    "max_batch_size": "service", "batch_wait_ms": "service", "cache_size": "service",
    "server_num_cpus": "service", "server_num_gpus": "service", "index_device": "service",
}


def embedding_identity(cfg: RootConfig, corpus: Path) -> dict:
    """What shapes the vectors: equal identity -> a finished shard can be reused."""
    r = cfg.retrieval
    return {
        "corpus_fingerprint": fingerprint_file(corpus),
        "embedder": r.embedder,
        "max_length": r.max_length,
        "precision": precision("cuda" if r.num_gpus > 0 else "cpu", r.fp16, r.cpu_bf16),
        "shard_size": r.shard_size,
    }


def index_identity(cfg: RootConfig, emb_fp: str) -> dict:
    """What shapes index.faiss given the vectors (their fingerprint `emb_fp`): equal identity -> no rebuild.
    Key names are kept stable so that existing indexes keep their fingerprints."""
    r = cfg.retrieval
    ident: dict = {"embeddings": emb_fp, "index_type": r.index_type}
    if r.index_type == "ivfpq":
        ident.update(nlist=r.ivf_nlist, pq_m=r.pq_m, pq_nbits=r.pq_nbits, train_size=r.train_size, seed=cfg.seed)
    elif r.index_type == "hnsw":
        ident.update(hnsw_m=r.hnsw_m, ef_construction=r.hnsw_ef_construction)
    return ident


def fingerprints(cfg: RootConfig, corpus: Path | None = None) -> tuple[str, str]:
    """(embeddings fingerprint, index fingerprint) of `cfg`: what `run` writes and `is_done` compares."""
    corpus = corpus or resolve_corpus(cfg.retrieval.corpus)
    emb_fp = _digest(embedding_identity(cfg, corpus))
    return emb_fp, _digest(index_identity(cfg, emb_fp))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------------ shards
def shard_path(emb_dir: Path, shard: Shard) -> Path:
    return emb_dir / f"{shard.name}.npy"


def shard_ok(path: Path, rows: int, dim: int | None) -> bool:
    """A shard counts as finished only if its header says exactly (rows, dim) float32."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return (arr.dtype == np.float32 and arr.ndim == 2 and arr.shape[0] == rows
            and (dim is None or arr.shape[1] == dim))


def write_shard(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(arr, dtype=np.float32))
    os.replace(tmp, path)


def load_plan(emb_dir: Path, corpus: Path, ident: dict) -> tuple[int, list[Shard]]:
    """Row count + shard ranges, cached (a JSONL plan means one pass over a possibly 14 GB file)."""
    key = {"corpus_fingerprint": ident["corpus_fingerprint"], "shard_size": ident["shard_size"]}
    cached = _read_json(emb_dir / "plan.json")
    if cached and cached.get("key") == key:
        return cached["count"], [Shard(**s) for s in cached["shards"]]
    t0 = time.time()
    count, shards = plan_shards(corpus, ident["shard_size"])
    log.info("planned %d rows in %d shards of %d (%.1fs)", count, len(shards), ident["shard_size"],
             time.time() - t0)
    _write_json(emb_dir / "plan.json", {"key": key, "count": count, "shards": [s.to_dict() for s in shards]})
    return count, shards


# ------------------------------------------------------------------------------------- Ray Data UDFs
def _read_chunks(batch: dict, corpus: str, chunk: int):
    """One shard spec -> its rows as chunks of `chunk` rows (one embedding forward pass each)."""
    import pyarrow as pa

    starts, shards, texts = [], [], []
    for i in range(len(batch["index"])):
        shard = Shard(**{k: int(batch[k][i]) for k in ("index", "start", "end", "offset", "line")})
        _, contents = read_shard(corpus, shard)
        for j in range(0, len(contents), chunk):
            shards.append(shard.index)
            starts.append(shard.start + j)
            texts.append(contents[j:j + chunk])
    return pa.table({"shard": pa.array(shards, pa.int64()), "start": pa.array(starts, pa.int64()),
                     "contents": pa.array(texts, pa.list_(pa.string()))})


class EmbedChunks:
    """Actor-pool UDF: holds one embedder; each call embeds whole chunks (deterministic batch composition)."""

    def __init__(self, spec: str, max_length: int, fp16: bool, cpu_bf16: bool, batch_size: int):
        from raydistill.retrieval.embedders import create_embedder

        self.embedder = create_embedder(spec, fp16=fp16, cpu_bf16=cpu_bf16, max_length=max_length,
                                        batch_size=batch_size)

    def __call__(self, batch: dict) -> dict:
        embs, ns, dims = [], [], []
        for texts in batch["contents"]:
            texts = [str(t) for t in texts]
            vecs = self.embedder.encode(texts, kind="passage", batch_size=len(texts))
            embs.append(vecs.tobytes())
            ns.append(vecs.shape[0])
            dims.append(vecs.shape[1])
        out = np.empty(len(embs), dtype=object)
        out[:] = embs
        return {"shard": batch["shard"], "start": batch["start"], "n": np.array(ns, np.int64),
                "dim": np.array(dims, np.int64), "embedding": out}


def embed_missing(cfg: RootConfig, corpus: Path, emb_dir: Path, missing: list[Shard], dim: int | None) -> int | None:
    """Run the Ray Data job over `missing` shards, writing each as it completes. Returns the embedding dim."""
    import ray
    import ray.data

    r = cfg.retrieval
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    # Pin the reads to this node (the corpus is a local file), as Ray Data does for its own local:// reads.
    here = {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}
    ds = ray.data.from_items([s.to_dict() for s in missing], override_num_blocks=len(missing))
    ds = ds.map_batches(_read_chunks, fn_kwargs={"corpus": str(corpus), "chunk": r.batch_size}, batch_size=1,
                        num_cpus=0.1, label_selector=here)
    ds = ds.map_batches(EmbedChunks, fn_constructor_kwargs={"spec": r.embedder, "max_length": r.max_length,
                                                             "fp16": r.fp16, "cpu_bf16": r.cpu_bf16,
                                                             "batch_size": r.batch_size},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=r.num_actors),
                        num_cpus=r.num_cpus, num_gpus=r.num_gpus or None)
    by_index = {s.index: s for s in missing}
    buffers: dict[int, np.ndarray] = {}
    filled: dict[int, int] = {}
    t0, done_rows = time.time(), 0
    for row in ds.iter_rows():
        shard = by_index[int(row["shard"])]
        n, d = int(row["n"]), int(row["dim"])
        if dim is None:
            dim = d
        if d != dim:
            raise RuntimeError(f"embedder returned {d}-d vectors, expected {dim}")
        vecs = np.frombuffer(row["embedding"], dtype=np.float32).reshape(n, d)
        buf = buffers.setdefault(shard.index, np.empty((shard.rows, d), np.float32))
        off = int(row["start"]) - shard.start
        buf[off:off + n] = vecs
        filled[shard.index] = filled.get(shard.index, 0) + n
        if filled[shard.index] == shard.rows:
            write_shard(shard_path(emb_dir, shard), buffers.pop(shard.index))
            done_rows += shard.rows
            log.info("shard %s written (%d rows; %.1f passages/s)", shard.name, shard.rows,
                     done_rows / max(time.time() - t0, 1e-9))
    if buffers:
        raise RuntimeError(f"embedding job ended with incomplete shards {sorted(buffers)}")
    return dim


# ------------------------------------------------------------------------------------------------ stage
def is_done(cfg: RootConfig) -> bool:
    index_dir = resolve_index_dir(cfg)
    meta = _read_json(index_dir / META_FILE)
    if not meta or not (index_dir / INDEX_FILE).exists():
        return False
    try:
        _, idx_fp = fingerprints(cfg)
    except Exception:  # noqa: BLE001 - e.g. the corpus is gone: then the index is not "done" for this config
        return False
    return meta.get("fingerprint") == idx_fp


def run(cfg: RootConfig, force: bool = False) -> dict:
    r = cfg.retrieval
    index_dir = resolve_index_dir(cfg)
    corpus = resolve_corpus(r.corpus)
    emb_dir = index_dir / EMB_DIR
    ident = embedding_identity(cfg, corpus)
    emb_fp = _digest(ident)
    idx_fp = _digest(index_identity(cfg, emb_fp))
    summary: dict = {"index_dir": str(index_dir), "index_path": str(index_dir / INDEX_FILE),
                     "meta_path": str(index_dir / META_FILE), "corpus": str(corpus)}
    if not force and is_done(cfg):
        meta = _read_json(index_dir / META_FILE) or {}
        return {**summary, "skipped": True, "count": meta.get("count"), "dim": meta.get("dim"),
                "shards": meta.get("shards"), "shards_computed": 0, "index_type": r.index_type}

    emb_dir.mkdir(parents=True, exist_ok=True)
    emb_meta = _read_json(emb_dir / META_FILE)
    if force or (emb_meta and emb_meta.get("fingerprint") != emb_fp):
        if emb_meta:
            log.warning("embeddings in %s were made under a different config (%s); recomputing them",
                        emb_dir, "forced" if force else "fingerprint changed")
        shutil.rmtree(emb_dir)
        emb_dir.mkdir(parents=True)
        emb_meta = None
    for stale in emb_dir.glob("*.tmp"):
        stale.unlink()  # a write cut short by a kill
    if emb_meta is None:
        emb_meta = {"fingerprint": emb_fp, "identity": ident, "dim": None}
        _write_json(emb_dir / META_FILE, emb_meta)

    count, shards = load_plan(emb_dir, corpus, ident)
    if count == 0:
        raise ValueError(f"{corpus}: the corpus has no passages")
    dim = emb_meta.get("dim")
    missing = [s for s in shards if not shard_ok(shard_path(emb_dir, s), s.rows, dim)]
    summary.update(count=count, shards=len(shards), shards_computed=len(missing),
                   shards_reused=len(shards) - len(missing))
    t0 = time.time()
    if missing:
        init_ray(cfg.ray)
        log.info("embedding %d of %d shards (%d rows) with %d actor(s)", len(missing), len(shards),
                 sum(s.rows for s in missing), r.num_actors)
        dim = embed_missing(cfg, corpus, emb_dir, missing, dim)
        emb_meta["dim"] = dim
        _write_json(emb_dir / META_FILE, emb_meta)
    embed_s = time.time() - t0
    if dim is None:
        dim = int(np.load(shard_path(emb_dir, shards[0]), mmap_mode="r").shape[1])
    bad = [s.name for s in shards if not shard_ok(shard_path(emb_dir, s), s.rows, dim)]
    if bad:
        raise RuntimeError(f"shards still missing or invalid after embedding: {bad[:5]}")

    t1 = time.time()
    chunks = [np.load(shard_path(emb_dir, s), mmap_mode="r") for s in shards]
    index = build_index(chunks, r.index_type, nlist=r.ivf_nlist, pq_m=r.pq_m, pq_nbits=r.pq_nbits,
                        hnsw_m=r.hnsw_m, ef_construction=r.hnsw_ef_construction, ef_search=r.hnsw_ef_search,
                        nprobe=r.nprobe, train_size=r.train_size, seed=cfg.seed)
    index.save(index_dir / INDEX_FILE)
    index_s = time.time() - t1
    meta = {
        "fingerprint": idx_fp, "corpus": str(corpus), "count": count, "dim": dim, "shards": len(shards),
        "index_type": r.index_type, "index_params": index.params,
        "embedder": {"spec": r.embedder, "max_length": r.max_length, "precision": ident["precision"]},
        "embeddings_fingerprint": emb_fp, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": _versions(),
    }
    _write_json(index_dir / META_FILE, meta)
    computed_rows = sum(s.rows for s in missing)
    summary.update(skipped=False, dim=dim, index_type=r.index_type, index_params=index.params,
                   embed_seconds=round(embed_s, 3), index_seconds=round(index_s, 3),
                   passages_per_s=round(computed_rows / embed_s, 2) if computed_rows and embed_s else None)
    return summary


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("faiss-cpu", "faiss-gpu-cu12", "torch", "transformers", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="recompute all embedding shards and the index")
    parser.add_argument("--serve", action="store_true",
                        help="after building, serve POST /retrieve (Search-R1 compatible) until interrupted")
    parser.add_argument("--host", default="127.0.0.1", help="with --serve: bind address")
    parser.add_argument("--port", type=int, default=8001, help="with --serve: port")


def main(cfg: RootConfig, args: argparse.Namespace) -> int:
    summary = run(cfg, force=bool(getattr(args, "force", False)))
    print(json.dumps(summary, indent=2))
    if getattr(args, "serve", False):
        from raydistill.actors.retriever import serve_http_forever

        serve_http_forever(cfg, host=args.host, port=args.port)
    return 0
