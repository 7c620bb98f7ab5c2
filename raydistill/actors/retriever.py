"""The retrieval service on Ray: one actor holding the index + query embedder, coalescing concurrent calls.

- `RetrieverService`: plain async class (usable without Ray too). Every `search()` call joins a queue; one
  drain loop takes everything pending (up to `max_batch_size` queries), embeds and searches it as ONE batch in
  a worker thread, and hands each caller its slice. Hundreds of episodes calling `web_search` one query at a
  time thus cost a few batched searches, not hundreds of single ones (the reference's pattern). Identical
  queries in a batch are searched once, and repeated ones are answered from an LRU cache.
- `RetrieverActor`: the Ray actor class (`start_retriever(cfg)` starts one sized from `cfg.retrieval`).
- `make_web_search_tool(handle)`: the `web_search(query) -> str` callable the sandbox runs in the host.
- `create_http_app(search)`: FastAPI app with `POST /retrieve`, request/response as the Search-R1 retriever
  (`{"queries": [...], "topk": k, "return_scores": true}` -> `{"result": [[{"document": {"id", "contents"},
  "score": s}, ...], ...]}`; without scores each result is the list of documents). `serve_http_forever` runs it
  with uvicorn; `retriever_deployment` wraps it as a Ray Serve ingress deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import ray
from pydantic import BaseModel, Field

from raydistill.retrieval.search import Hit, Retriever
from raydistill.retrieval.tool import check_query, format_web_search

log = logging.getLogger(__name__)


class RetrieverService:
    """Coalescing front of a `Retriever`. All methods are async; run it in one event loop (a Ray async actor)."""

    def __init__(self, index_dir: str | None = None, *, retriever: Retriever | None = None, top_k: int = 3,
                 max_batch_size: int = 256, batch_wait_ms: float = 2.0, device: str | None = None,
                 index_device: str = "auto", fp16: bool = True, cpu_bf16: bool = False, nprobe: int | None = None,
                 ef_search: int | None = None, refine_factor: int = 0, cache_size: int = 4096):
        if retriever is None:
            if index_dir is None:
                raise ValueError("RetrieverService needs index_dir or retriever")
            retriever = Retriever.from_index_dir(index_dir, device=device, index_device=index_device, fp16=fp16,
                                                 cpu_bf16=cpu_bf16, nprobe=nprobe, ef_search=ef_search, refine_factor=refine_factor,
                                                 batch_size=max_batch_size)
        self.retriever = retriever
        self.top_k = top_k
        self.max_batch_size = max_batch_size
        self.wait_s = batch_wait_ms / 1000.0
        self._pending: list[tuple[list[str], int, asyncio.Future]] = []
        self._pending_queries = 0
        self._drainer: asyncio.Task | None = None
        self.cache_size = cache_size
        self._cache: OrderedDict[str, list[Hit]] = OrderedDict()  # query -> hits (for the largest k seen)
        self._stats = {"calls": 0, "queries": 0, "batches": 0, "largest_batch": 0, "searched": 0,
                       "cache_hits": 0, "search_s": 0.0}

    async def ready(self) -> dict:
        return {"count": len(self.retriever.passages), "dim": self.retriever.index.dim,
                "embedder": self.retriever.embedder.spec, "index": self.retriever.index.kind,
                "index_device": self.retriever.index.device, "device": self.retriever.embedder.device}

    async def stats(self) -> dict:
        return dict(self._stats)

    async def search(self, queries: list[str], k: int | None = None) -> list[list[Hit]]:
        """Top-k hits per query, best first. Concurrent calls are searched together."""
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query in a list")
        bad = [i for i, q in enumerate(queries) if not isinstance(q, str)]
        if bad:
            raise TypeError(f"query {bad[0]} is a {type(queries[bad[0]]).__name__}, not a string")
        k = int(k or self.top_k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self._stats["calls"] += 1
        if not queries:
            return []
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((list(queries), k, fut))
        self._pending_queries += len(queries)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await fut

    async def web_search(self, query: str, k: int | None = None) -> str:
        q = check_query(query)
        return format_web_search(q, (await self.search([q], k))[0])

    async def retrieve(self, queries: list[str], topk: int | None = None, return_scores: bool = False) -> dict:
        """The Search-R1 `/retrieve` response body."""
        return to_search_r1(await self.search(queries, topk), return_scores)

    async def _drain(self) -> None:
        while self._pending:
            if self.wait_s and self._pending_queries < self.max_batch_size:
                await asyncio.sleep(self.wait_s)  # let callers arriving at the same moment join this batch
            take, n = [], 0
            while self._pending and (not take or n + len(self._pending[0][0]) <= self.max_batch_size):
                item = self._pending.pop(0)
                take.append(item)
                n += len(item[0])
            self._pending_queries -= n
            kmax = max(item[1] for item in take)
            # Identical queries (sag candidates often search the same words) are searched once; answers for
            # queries seen before come from an LRU cache (the index does not change under a running service).
            known = {q: hits for item in take for q in item[0]
                     if (hits := self._cache.get(q)) is not None and len(hits) >= min(kmax, self._ntotal)}
            todo = list(dict.fromkeys(q for item in take for q in item[0] if q not in known))
            t0 = time.perf_counter()
            try:
                found = await asyncio.to_thread(self.retriever.search, todo, kmax) if todo else []
            except Exception as e:  # noqa: BLE001 - delivered to every caller of this batch
                for *_, fut in take:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            answers = {**known, **dict(zip(todo, found, strict=True))}
            for q in todo:
                self._remember(q, answers[q])
            for q in known:
                self._cache.move_to_end(q)
            self._stats["search_s"] += time.perf_counter() - t0
            self._stats["batches"] += 1
            self._stats["queries"] += n
            self._stats["searched"] += len(todo)
            self._stats["cache_hits"] += sum(q in known for item in take for q in item[0])
            self._stats["largest_batch"] = max(self._stats["largest_batch"], n)
            for qs, k, fut in take:
                if not fut.done():
                    fut.set_result([answers[q][:k] for q in qs])

    @property
    def _ntotal(self) -> int:
        return self.retriever.index.ntotal

    def _remember(self, query: str, hits: list[Hit]) -> None:
        if self.cache_size <= 0:
            return
        self._cache[query] = hits
        self._cache.move_to_end(query)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


RetrieverActor = ray.remote(RetrieverService)


class QueryRequest(BaseModel):
    """The Search-R1 retriever's request body."""

    queries: list[str]
    topk: int | None = Field(None, ge=1, le=1000)
    return_scores: bool = False


def to_search_r1(results: list[list[Hit]], return_scores: bool) -> dict:
    docs = [[{"document": {"id": h.id, "contents": h.contents}, "score": h.score} for h in hits]
            for hits in results]
    if not return_scores:
        docs = [[d["document"] for d in hits] for hits in docs]
    return {"result": docs}


def start_retriever(cfg, index_dir: str | Path | None = None, *, name: str | None = None) -> Any:
    """Start a `RetrieverActor` for `cfg` (RootConfig) and wait until its index is loaded. Returns the handle."""
    from raydistill.retrieval import resolve_index_dir

    r = cfg.retrieval
    index_dir = Path(index_dir) if index_dir else resolve_index_dir(cfg)
    opts: dict[str, Any] = {"num_cpus": r.server_num_cpus, "num_gpus": r.server_num_gpus, "max_concurrency": 1000}
    if name:
        opts["name"] = name
    handle = RetrieverActor.options(**opts).remote(
        str(index_dir), top_k=r.top_k, max_batch_size=r.max_batch_size, batch_wait_ms=r.batch_wait_ms,
        fp16=r.fp16, cpu_bf16=r.cpu_bf16, nprobe=r.nprobe, ef_search=r.hnsw_ef_search,
        refine_factor=r.refine_factor,
        cache_size=r.cache_size,
        index_device=r.index_device if r.server_num_gpus > 0 else "cpu")
    info = ray.get(handle.ready.remote())
    log.info("retriever ready: %s", info)
    return handle


def make_web_search_tool(handle, k: int | None = None, timeout_s: float = 120.0, sync: bool = False) -> Callable:
    """`web_search(query: str) -> str` for the sandbox (it runs in the host process, never in the sandbox).
    Async by default (the sandbox awaits it); `sync=True` gives a blocking version. Picklable: it holds only
    the actor handle, so it can be shipped to sandbox host actors."""
    if sync:
        def web_search_sync(query: str) -> str:
            """Semantic search over the Wikipedia corpus; returns the top passages as text."""
            return ray.get(handle.web_search.remote(check_query(query), k), timeout=timeout_s)

        web_search_sync.__name__ = "web_search"
        return web_search_sync

    async def web_search(query: str) -> str:
        """Semantic search over the Wikipedia corpus; returns the top passages as text."""
        return await asyncio.wait_for(handle.web_search.remote(check_query(query), k), timeout_s)

    return web_search


def handle_search(handle) -> Callable[[list[str], int | None], Awaitable[list[list[Hit]]]]:
    async def search(queries: list[str], k: int | None) -> list[list[Hit]]:
        return await handle.search.remote(queries, k)

    return search


def create_http_app(search: Callable[[list[str], int | None], Awaitable[list[list[Hit]]]], default_topk: int = 3):
    """FastAPI app: `POST /retrieve` (Search-R1 compatible) and `GET /health`. `search` is e.g.
    `RetrieverService(...).search` or `handle_search(actor_handle)`."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="raydistill retriever")

    @app.post("/retrieve")
    async def retrieve(req: QueryRequest) -> dict:
        try:
            results = await search(req.queries, req.topk or default_topk)
        except (TypeError, ValueError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        return to_search_r1(results, req.return_scores)

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    return app


def retriever_deployment(handle, default_topk: int = 3, num_cpus: float = 0.1):
    """A Ray Serve application (ingress deployment) exposing `/retrieve` in front of a RetrieverActor.
    Run with `serve.run(retriever_deployment(h), route_prefix="/")` after `serve.start(http_options=...)`."""
    from ray import serve

    app = create_http_app(handle_search(handle), default_topk)

    @serve.deployment(ray_actor_options={"num_cpus": num_cpus})
    @serve.ingress(app)
    class RetrieveIngress:
        pass

    return RetrieveIngress.bind()


def serve_http_forever(cfg, host: str = "127.0.0.1", port: int = 8001) -> None:
    """`raydistill index --serve`: a RetrieverActor behind uvicorn until interrupted."""
    import uvicorn

    from raydistill.stages.ray_init import init_ray

    init_ray(cfg.ray)
    handle = start_retriever(cfg)
    app = create_http_app(handle_search(handle), cfg.retrieval.top_k)
    log.info("serving POST http://%s:%d/retrieve", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
