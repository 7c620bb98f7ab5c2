"""Retrieval throughput on this machine: batched vs one query at a time (how the reference calls its retriever).

Measures, in one run (so ratios compare like with like):
- passages/s embedded (MiniLM, in-process, length-sorted batches);
- queries/s end to end in-process (query embedding + faiss flat search + passage lookup):
  one query per call vs one call for a batch;
- queries/s through HTTP POST /retrieve (Search-R1 format) on 127.0.0.1: one query per request sent one after
  another (the reference), the same single-query requests sent concurrently (coalesced by the service into
  batches), and batched requests.

    python benchmarks/retrieval.py [--queries 256] [--passages 1000] [--rounds 3] [--out results.json]
    python benchmarks/retrieval.py --write-docs     # also replace the generated table in docs/benchmarks.md

Precisions (`--dtypes`): float32 (the default numerics), bfloat16 (`retrieval.cpu_bf16`), int8 (torch dynamic
int8 Linear layers; an experiment, not a config key). Each also reports hit@1 of the 472 "Who is <title>?"
queries over the full bundled sample, so a faster precision's cost in quality is in the same table.

Each path is timed in alternating rounds (baseline, then batched) and medians are reported, with CPU time per
query beside wall time: on a shared machine the wall clock moves with everyone else's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("inf")


class Clock:
    """Wall and CPU time of a block; CPU time (this process, all threads) is what a shared, overloaded machine
    distorts least, so both are reported."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def _summary(rounds: list[dict], n_single: int, n_batched: int, single_key: str, batched_key: str) -> dict:
    """Medians over rounds; each round times the baseline and the batched path back to back."""
    med = lambda xs: float(statistics.median(xs))  # noqa: E731
    sw, sc = med([r[single_key][0] for r in rounds]), med([r[single_key][1] for r in rounds])
    bw, bc = med([r[batched_key][0] for r in rounds]), med([r[batched_key][1] for r in rounds])
    return {"one_at_a_time_qps": _rate(n_single, sw), "batched_qps": _rate(n_batched, bw),
            "ratio": round((n_batched / bw) / (n_single / sw), 2),
            "one_at_a_time_cpu_ms_per_query": round(1000 * sc / n_single, 2),
            "batched_cpu_ms_per_query": round(1000 * bc / n_batched, 2),
            "cpu_ratio": round((sc / n_single) / (bc / n_batched), 2)}


def bench_inprocess(retriever, queries: list[str], k: int, single_n: int, rounds: int) -> dict:
    retriever.search(queries[:8], k)  # warm up
    out = []
    for _ in range(rounds):
        r = {}
        with Clock() as c:
            for q in queries[:single_n]:
                retriever.search([q], k)
        r["single"] = (c.wall, c.cpu)
        with Clock() as c:
            retriever.search(queries, k)
        r["batched"] = (c.wall, c.cpu)
        out.append(r)
    res = _summary(out, single_n, len(queries), "single", "batched")
    res.update(single_queries=single_n, batch=len(queries), rounds=rounds)
    return res


def bench_http(retriever, queries: list[str], k: int, single_n: int, concurrency: int, rounds: int) -> dict:
    import httpx
    import uvicorn

    from raydistill.actors.retriever import RetrieverService, create_http_app

    # cache off: every round repeats the same queries, and a cache hit would not measure search
    svc = RetrieverService(retriever=retriever, top_k=k, max_batch_size=256, batch_wait_ms=2.0, cache_size=0)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_http_app(svc.search, k), host="127.0.0.1", port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/retrieve"

    async def concurrent() -> None:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=300) as ac:
            async def one(q):
                async with sem:
                    r = await ac.post(url, json={"queries": [q], "topk": k, "return_scores": True})
                    r.raise_for_status()

            await asyncio.gather(*(one(q) for q in queries))

    out = []
    try:
        with httpx.Client(timeout=300) as c:
            c.post(url, json={"queries": queries[:8], "topk": k})
            for _ in range(rounds):
                r = {}
                with Clock() as t:  # the reference: one request per query, one after another
                    for q in queries[:single_n]:
                        c.post(url, json={"queries": [q], "topk": k, "return_scores": True}).raise_for_status()
                r["single"] = (t.wall, t.cpu)
                with Clock() as t:
                    for i in range(0, len(queries), 64):
                        c.post(url, json={"queries": queries[i:i + 64], "topk": k,
                                          "return_scores": True}).raise_for_status()
                r["batched"] = (t.wall, t.cpu)
                before = svc._stats["batches"]
                with Clock() as t:
                    asyncio.run(concurrent())
                r["concurrent"] = (t.wall, t.cpu)
                r["concurrent_batches"] = svc._stats["batches"] - before
                out.append(r)
    finally:
        server.should_exit = True
        th.join(10)
    res = {"batched_requests_of_64": _summary(out, single_n, len(queries), "single", "batched"),
           "concurrent_single_query_clients": _summary(out, single_n, len(queries), "single", "concurrent")}
    res["concurrent_single_query_clients"].update(
        clients=concurrency, service_batches=int(statistics.median(r["concurrent_batches"] for r in out)))
    res.update(single_queries=single_n, queries=len(queries), rounds=rounds)
    return res


def bench_ray_actor(index_dir: str, queries: list[str], k: int, single_n: int, rounds: int, cpu_bf16: bool) -> dict:
    """The agents' path: a RetrieverActor; sequential single-query calls vs the same queries as concurrent
    single-query calls (coalesced by the actor) vs one batched call. CPU time here is the driver's only."""
    import ray

    from raydistill.actors.retriever import RetrieverActor

    h = RetrieverActor.options(num_cpus=1, max_concurrency=1000).remote(
        index_dir, top_k=k, max_batch_size=256, batch_wait_ms=2.0, cache_size=0, cpu_bf16=cpu_bf16,
        index_device="cpu")
    ray.get(h.ready.remote())
    ray.get(h.search.remote(queries[:8], k))
    out = []
    for _ in range(rounds):
        r = {}
        with Clock() as t:
            for q in queries[:single_n]:
                ray.get(h.search.remote([q], k))
        r["single"] = (t.wall, t.cpu)
        before = ray.get(h.stats.remote())["batches"]
        with Clock() as t:
            ray.get([h.search.remote([q], k) for q in queries])
        r["concurrent"] = (t.wall, t.cpu)
        r["batches"] = ray.get(h.stats.remote())["batches"] - before
        with Clock() as t:
            ray.get(h.search.remote(queries, k))
        r["batched"] = (t.wall, t.cpu)
        out.append(r)
    ray.kill(h)
    res = {"one_call_of_all_queries": _summary(out, single_n, len(queries), "single", "batched"),
           "concurrent_single_query_calls": _summary(out, single_n, len(queries), "single", "concurrent")}
    res["concurrent_single_query_calls"]["service_batches"] = int(statistics.median(r["batches"] for r in out))
    return res


def title_hit_at_1(emb, corpus, vecs) -> dict:
    """hit@1 of "Who is <title>?" over all titles of `corpus` (the quality test's measure), flat exact search
    over `vecs`, the embeddings of all its passages."""
    import numpy as np

    from raydistill.retrieval import build_index

    titles = sorted({corpus.title(i) for i in range(len(corpus))})
    _, ids = build_index(vecs, "flat").search(emb.encode([f"Who is {t}?" for t in titles], "query"), 1)
    hit = np.mean([corpus.title(int(i)) == t for i, t in zip(ids[:, 0], titles, strict=True)])
    return {"who_is_title_hit_at_1": round(float(hit), 4), "titles": len(titles)}


NAMES = {"float32": "fp32", "bfloat16": "bf16 (`cpu_bf16`)", "int8": "int8 (dynamic)"}
BEGIN, END = "<!-- retrieval-bench:begin -->", "<!-- retrieval-bench:end -->"


def markdown(result: dict) -> str:
    """The results as the markdown block kept in docs/benchmarks.md (between BEGIN and END)."""
    a, m = result["args"], result["machine"]
    lines = [BEGIN, f"Generated by `python benchmarks/retrieval.py --write-docs` on {time.strftime('%Y-%m-%d %H:%M')} "
             f"({m['cpus']} CPUs, {a['threads']} torch thread(s), load average {m['load_avg_1m_before']:.1f} → "
             f"{m['load_avg_1m_after']:.1f}); {a['passages']} passages, {a['queries']} distinct queries, "
             f"{a['single']} timed one at a time, {a['rounds']} rounds (medians), k={a['k']}. Ratios: batched "
             "q/s over one-at-a-time q/s (wall), and CPU ms/query one-at-a-time over batched (this process's "
             "CPU time; for the Ray actor the driver's only).", "",
             "| embeddings | path | one at a time q/s | batched q/s | ratio (wall) | CPU ms/query: one / batched "
             "| ratio (CPU) |", "|---|---|---:|---:|---:|---:|---:|"]
    for dtype, run in result["runs"].items():
        ip = run["inprocess"]
        hb, hc = run["http"]["batched_requests_of_64"], run["http"]["concurrent_single_query_clients"]
        rows = [(f"in-process: query embedding + flat search, one call of {a['queries']}", ip),
                ("HTTP /retrieve, requests of 64 queries", hb),
                (f"HTTP /retrieve, {hc['clients']} concurrent 1-query clients "
                 f"(coalesced into {hc['service_batches']} batches)", hc)]
        if "ray_actor" in run:
            ra, rc = run["ray_actor"]["one_call_of_all_queries"], run["ray_actor"]["concurrent_single_query_calls"]
            rows += [(f"Ray actor, one call of {a['queries']}", ra),
                     (f"Ray actor, {a['queries']} concurrent 1-query calls "
                      f"(coalesced into {rc['service_batches']} batches)", rc)]
        for name, r in rows:
            lines.append(f"| {NAMES.get(dtype, dtype)} | {name} | {r['one_at_a_time_qps']} | {r['batched_qps']} | "
                         f"{r['ratio']}× | {r['one_at_a_time_cpu_ms_per_query']} / {r['batched_cpu_ms_per_query']} "
                         f"| {r['cpu_ratio']}× |")
    lines += ["", "| embeddings | passages embedded /s | CPU ms/passage | hit@1, `Who is <title>?` (472 titles) |",
              "|---|---:|---:|---:|"]
    for dtype, run in result["runs"].items():
        e, q = run["embedding"], run["quality"]
        hit = f"{q['who_is_title_hit_at_1']:.3f}" if q else "- (needs all passages)"
        lines.append(f"| {NAMES.get(dtype, dtype)} | {e['passages_per_s']} | {e['cpu_ms_per_passage']} | {hit} |")
    lines.append(END)
    return "\n".join(lines)


def write_docs(path: Path, block: str) -> None:
    """Replace the marked block in `path` (append it under "## Retrieval" the first time)."""
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif "## Retrieval\n" in text:
        text = text.replace("## Retrieval\n", "## Retrieval\n\n" + block + "\n", 1)
    else:
        text = text.rstrip("\n") + "\n\n## Retrieval\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote the retrieval table into {path}")


def _index_dir(corpus, vecs, embedder: str) -> str:
    """A minimal index dir (what `raydistill index` writes) for the actor to load."""
    import tempfile

    from raydistill.retrieval import build_index

    d = Path(tempfile.mkdtemp(prefix="retrieval-bench-"))
    path = d / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(len(corpus)):
            f.write(json.dumps({"id": corpus.id(i), "contents": corpus.contents(i)}) + "\n")
    build_index(vecs, "flat").save(d / "index.faiss")
    (d / "meta.json").write_text(json.dumps({
        "corpus": str(path), "count": len(corpus), "dim": int(vecs.shape[1]), "index_type": "flat",
        "index_params": {}, "embedder": {"spec": embedder, "max_length": 256}}))
    return str(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="bundled:wiki18_sample_1000")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--passages", type=int, default=1000, help="passages to embed and index")
    ap.add_argument("--queries", type=int, default=256, help="distinct queries (at most 944 on the sample)")
    ap.add_argument("--single", type=int, default=64, help="queries timed one at a time")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients")
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="alternating baseline/batched rounds (medians)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable on a shared, oversubscribed box; 0 = torch default)")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8",
                    help="CPU embedding precisions to measure (bfloat16 = retrieval.cpu_bf16, int8 = dynamic int8)")
    ap.add_argument("--write-docs", nargs="?", const="docs/benchmarks.md", default=None, metavar="PATH",
                    help="replace the block between the retrieval-bench markers in PATH (docs/benchmarks.md)")
    ap.add_argument("--ray", action="store_true", help="also measure through a RetrieverActor on a local Ray")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ray:
        import ray

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads or 2), "HF_HUB_OFFLINE": "1"}})

    from raydistill.retrieval import Retriever, build_index, create_embedder, read_corpus
    from raydistill.retrieval.corpus import Corpus, resolve_corpus

    corpus = read_corpus(resolve_corpus(args.corpus))
    titles = sorted({corpus.title(i) for i in range(len(corpus))})
    questions = [f"Who is {t}?" for t in titles] + [f"What is known about {t}?" for t in titles]
    ids, texts = corpus.rows(0, min(args.passages, len(corpus)))
    corpus = Corpus.from_rows(list(zip(ids, texts, strict=True)))
    queries = questions[:args.queries]  # distinct queries: the service's dedup/cache must not flatter batching
    single_n = min(args.single, len(queries))

    load0 = os.getloadavg()[0]
    result: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "platform": platform.platform(), "load_avg_1m_before": load0},
                    "embedder": args.embedder, "passages": len(texts), "queries": len(queries), "runs": {}}
    full = read_corpus(resolve_corpus(args.corpus))
    for dtype in args.dtypes.split(","):
        if dtype not in ("float32", "bfloat16", "int8"):
            raise SystemExit(f"--dtypes: unknown precision {dtype!r} (float32, bfloat16, int8)")
        emb = create_embedder(args.embedder, batch_size=64, cpu_bf16=(dtype == "bfloat16"),
                              cpu_int8=(dtype == "int8"))
        emb.encode(texts[:16], "passage")
        with Clock() as c:
            vecs = emb.encode(texts, "passage")
        run = {"embedding": {"passages_per_s": _rate(len(texts), c.wall),
                             "cpu_ms_per_passage": round(1000 * c.cpu / len(texts), 1)}}
        # quality needs every passage embedded: only with --passages covering the corpus (the default)
        run["quality"] = title_hit_at_1(emb, full, vecs) if len(texts) == len(full) else None
        retriever = Retriever(emb, build_index(vecs, "flat"), corpus, batch_size=256)
        run["inprocess"] = bench_inprocess(retriever, queries, args.k, single_n, args.rounds)
        run["http"] = bench_http(retriever, queries, args.k, single_n, args.concurrency, args.rounds)
        if args.ray and dtype != "int8":  # the service has no int8 switch (not a config key)
            run["ray_actor"] = bench_ray_actor(_index_dir(corpus, vecs, args.embedder), queries, args.k, single_n,
                                               args.rounds, dtype == "bfloat16")
        result["runs"][dtype] = run
        print(f"{dtype} done", flush=True)
    result["machine"]["load_avg_1m_after"] = os.getloadavg()[0]
    result["args"] = {"passages": len(texts), "queries": len(queries), "single": single_n, "rounds": args.rounds,
                      "threads": torch.get_num_threads(), "k": args.k, "ray": bool(args.ray)}
    print(json.dumps(result, indent=2))
    table = markdown(result)
    print("\n" + table)
    if args.write_docs:
        write_docs(Path(args.write_docs), table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
