"""Retrieval throughput on this machine: batched vs one query at a time (how the reference calls its retriever).

Measures, in one run (so ratios compare like with like):
- passages/s embedded (MiniLM, in-process, length-sorted batches);
- queries/s end to end in-process (query embedding + faiss flat search + passage lookup):
  one query per call vs one call for a batch;
- queries/s through HTTP POST /retrieve (Search-R1 format) on 127.0.0.1: one query per request sent one after
  another (the reference), the same single-query requests sent concurrently (coalesced by the service into
  batches), and batched requests.

    python benchmarks/retrieval.py [--queries 256] [--passages 1000] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import threading
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("inf")


def bench_inprocess(retriever, queries: list[str], k: int, single_n: int) -> dict:
    retriever.search(queries[:8], k)  # warm up
    t = time.perf_counter()
    for q in queries[:single_n]:
        retriever.search([q], k)
    single = _rate(single_n, time.perf_counter() - t)
    t = time.perf_counter()
    retriever.search(queries, k)
    batched = _rate(len(queries), time.perf_counter() - t)
    return {"one_at_a_time_qps": single, "batched_qps": batched, "ratio": round(batched / single, 2),
            "single_queries": single_n, "batch": len(queries)}


def bench_http(retriever, queries: list[str], k: int, single_n: int, concurrency: int) -> dict:
    import httpx
    import uvicorn

    from raydistill.actors.retriever import RetrieverService, create_http_app

    svc = RetrieverService(retriever=retriever, top_k=k, max_batch_size=256, batch_wait_ms=2.0)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_http_app(svc.search, k), host="127.0.0.1", port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/retrieve"
    out: dict = {}
    try:
        with httpx.Client(timeout=300) as c:
            c.post(url, json={"queries": queries[:8], "topk": k})
            t = time.perf_counter()
            for q in queries[:single_n]:
                c.post(url, json={"queries": [q], "topk": k, "return_scores": True}).raise_for_status()
            out["one_at_a_time_qps"] = _rate(single_n, time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(0, len(queries), 64):
                c.post(url, json={"queries": queries[i:i + 64], "topk": k, "return_scores": True}).raise_for_status()
            out["batched_requests_qps"] = _rate(len(queries), time.perf_counter() - t)

        async def concurrent() -> float:
            sem = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(timeout=300) as ac:
                async def one(q):
                    async with sem:
                        r = await ac.post(url, json={"queries": [q], "topk": k, "return_scores": True})
                        r.raise_for_status()

                t0 = time.perf_counter()
                await asyncio.gather(*(one(q) for q in queries))
                return time.perf_counter() - t0

        before = dict(svc._stats)
        out["concurrent_single_qps"] = _rate(len(queries), asyncio.run(concurrent()))
        batches = svc._stats["batches"] - before["batches"]
        out["concurrent_batches"] = batches
        out["concurrent_clients"] = concurrency
    finally:
        server.should_exit = True
        th.join(10)
    base = out["one_at_a_time_qps"]
    out["ratio_batched_requests"] = round(out["batched_requests_qps"] / base, 2)
    out["ratio_concurrent_single"] = round(out["concurrent_single_qps"] / base, 2)
    out["single_queries"] = single_n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="bundled:wiki18_sample_1000")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--passages", type=int, default=1000, help="passages to embed and index")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--single", type=int, default=64, help="queries timed one at a time")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients")
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from raydistill.retrieval import Retriever, build_index, create_embedder, read_corpus
    from raydistill.retrieval.corpus import Corpus, resolve_corpus

    corpus = read_corpus(resolve_corpus(args.corpus))
    ids, texts = corpus.rows(0, min(args.passages, len(corpus)))
    corpus = Corpus.from_rows(list(zip(ids, texts, strict=True)))
    emb = create_embedder(args.embedder, batch_size=64)
    emb.encode(texts[:16], "passage")
    t = time.perf_counter()
    vecs = emb.encode(texts, "passage")
    embed_s = time.perf_counter() - t
    index = build_index(vecs, "flat")
    retriever = Retriever(emb, index, corpus, batch_size=256)
    titles = sorted({corpus.title(i) for i in range(len(corpus))})
    queries = [f"Who is {titles[i % len(titles)]}?" for i in range(args.queries)]
    single_n = min(args.single, len(queries))

    result = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
        "embedder": args.embedder,
        "passages": len(texts),
        "embed_passages_per_s": _rate(len(texts), embed_s),
        "inprocess": bench_inprocess(retriever, queries, args.k, single_n),
        "http": bench_http(retriever, queries, args.k, single_n, args.concurrency),
        "load_avg_1m_after": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=2))
    ip, hp = result["inprocess"], result["http"]
    print("\n| path | one at a time q/s | batched q/s | ratio |\n|---|---|---|---|")
    print(f"| in-process (embed + search) | {ip['one_at_a_time_qps']} | {ip['batched_qps']} | {ip['ratio']}x |")
    print(f"| HTTP, batched requests of 64 | {hp['one_at_a_time_qps']} | {hp['batched_requests_qps']} | "
          f"{hp['ratio_batched_requests']}x |")
    print(f"| HTTP, {hp['concurrent_clients']} concurrent single-query clients (coalesced into "
          f"{hp['concurrent_batches']} batches) | {hp['one_at_a_time_qps']} | {hp['concurrent_single_qps']} | "
          f"{hp['ratio_concurrent_single']}x |")
    print(f"\npassages embedded: {result['embed_passages_per_s']}/s ({len(texts)} passages)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
