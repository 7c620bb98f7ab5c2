"""On a real local Ray: the `raydistill index` stage (Ray Data actor pool, shards, resumption after deletions,
corruption and a killed driver), the retriever actor with call coalescing, the web_search tool through a real
sandbox, and HTTP POST /retrieve (uvicorn and Ray Serve) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from raydistill.config import load_config
from raydistill.retrieval.corpus import plan_shards
from raydistill.stages import index as index_stage

N = 64  # passages: the first 64 of the bundled sample (4 shards of 16)


def _cfg(run_dir: Path, corpus: Path, *extra: str):
    return load_config(None, [f"run_dir={run_dir}", f"retrieval.corpus={corpus}", "retrieval.shard_size=16",
                              "retrieval.batch_size=8", "retrieval.num_actors=2", "retrieval.num_cpus=0.5",
                              "retrieval.server_num_cpus=0.1", *extra])


def _shards(index_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((index_dir / "embeddings").glob("emb-*.npy"))}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, sample_path) -> Path:
    path = tmp_path_factory.mktemp("corpus") / f"wiki{N}.jsonl"
    with open(sample_path) as f:
        path.write_text("".join(next(f) for _ in range(N)))
    return path


@pytest.fixture(scope="module")
def built(ray_local, small_corpus, tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("run"), small_corpus)
    t0 = time.time()
    summary = index_stage.run(cfg)
    print(f"index stage on {N} passages: {time.time() - t0:.1f}s {summary}")
    return cfg, summary


def test_index_stage_builds_shards_and_index(built, passage_vecs):
    cfg, s = built
    index_dir = Path(s["index_dir"])
    assert index_dir == cfg.run_path / "index"
    assert (s["count"], s["shards"], s["shards_computed"], s["dim"]) == (N, 4, 4, 384)
    assert list(_shards(index_dir)) == ["emb-000000000000-000000000016.npy", "emb-000000000016-000000000032.npy",
                                        "emb-000000000032-000000000048.npy", "emb-000000000048-000000000064.npy"]
    meta = json.loads((index_dir / "meta.json").read_text())
    assert meta["count"] == N and meta["embedder"]["spec"] == "minilm" and meta["index_type"] == "flat"
    assert index_stage.is_done(cfg)
    # The actor pool's vectors are MiniLM's: the same as embedding in-process (different batches -> ~1e-7).
    vecs = np.concatenate([np.load(index_dir / "embeddings" / n) for n in _shards(index_dir)])
    np.testing.assert_allclose(vecs, passage_vecs[:N], atol=1e-5)


def test_rerun_skips_and_resumes_only_missing_or_broken_shards(built):
    cfg, s = built
    index_dir = Path(s["index_dir"])
    t0 = time.time()
    again = index_stage.run(cfg)
    assert again["skipped"] and again["shards_computed"] == 0 and time.time() - t0 < 5

    before = _shards(index_dir)
    emb = index_dir / "embeddings"
    names = list(before)
    keep_mtime = {n: (emb / n).stat().st_mtime_ns for n in (names[0], names[3])}
    (emb / names[1]).unlink()                                        # shard lost
    (emb / names[2]).write_bytes(before[names[2]][: len(before[names[2]]) // 2])  # truncated shard
    (emb / (names[1] + ".tmp")).write_bytes(b"partial write")        # what a killed write leaves
    (index_dir / "meta.json").unlink()
    assert not index_stage.is_done(cfg)

    resumed = index_stage.run(cfg)
    assert (resumed["shards_computed"], resumed["shards_reused"]) == (2, 2)
    after = _shards(index_dir)
    assert not list(emb.glob("*.tmp"))
    assert {n: (emb / n).stat().st_mtime_ns for n in keep_mtime} == keep_mtime  # untouched
    assert after == before  # recomputed shards are bit-identical: the build is deterministic
    assert index_stage.is_done(cfg)


def test_killed_index_job_resumes_where_it_stopped(ray_local, small_corpus, tmp_path):
    """A real `raydistill index` process joined to this cluster is SIGKILLed after its first shard lands;
    the rerun computes exactly the shards that were not written."""
    import ray

    corpus = tmp_path / "wiki32.jsonl"
    corpus.write_text("".join(small_corpus.read_text().splitlines(keepends=True)[:32]))
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", f"retrieval.corpus={corpus}", "retrieval.shard_size=4",
            "retrieval.batch_size=4", "retrieval.num_actors=1", "retrieval.num_cpus=0.5",
            f"ray.address={ray.get_runtime_context().gcs_address}"]
    emb = run_dir / "index" / "embeddings"
    log = tmp_path / "index.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "raydistill", "index", *args], start_new_session=True,
                                stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(emb.glob("emb-*.npy")) and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    present = {p.name for p in emb.glob("emb-*.npy")}
    total = len(plan_shards(corpus, 4)[1])
    assert 1 <= len(present) < total
    mtimes = {n: (emb / n).stat().st_mtime_ns for n in present}
    summary = index_stage.run(load_config(None, args[:-1]))
    assert summary["shards_computed"] == total - len(present)
    assert {n: (emb / n).stat().st_mtime_ns for n in present} == mtimes


# --------------------------------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def service(built):
    from raydistill.actors.retriever import start_retriever

    cfg, _ = built
    return start_retriever(cfg)


def test_actor_coalesces_concurrent_calls(service, corpus):
    import ray

    titles = [corpus.title(i) for i in range(0, N, 2)]  # 32 calls, titles present in the 64 passages
    before = ray.get(service.stats.remote())
    refs = [service.search.remote([t], 3) for t in titles]
    results = ray.get(refs)
    stats = ray.get(service.stats.remote())
    calls, batches = stats["calls"] - before["calls"], stats["batches"] - before["batches"]
    print(f"{calls} concurrent calls served in {batches} batches (largest {stats['largest_batch']})")
    assert calls == len(titles) and batches < calls / 4
    results = [r[0] for r in results]  # one query per call
    hit1 = np.mean([hits[0].title == t for hits, t in zip(results, titles, strict=True)])
    assert all(len(h) == 3 for h in results) and hit1 >= 0.9
    # different k in one batch: each caller gets its own k
    a, b = ray.get([service.search.remote(["Evan Morris"], 1), service.search.remote(["Evan Morris"], 5)])
    assert len(a[0]) == 1 and len(b[0]) == 5 and (a[0][0].row, a[0][0].id) == (b[0][0].row, b[0][0].id)
    # the two queries may be embedded in different batches: scores agree to float noise, not bit for bit
    assert a[0][0].score == pytest.approx(b[0][0].score, abs=1e-5)


def test_web_search_tool_end_to_end_through_a_sandbox(service):
    import cloudpickle

    from raydistill.actors.retriever import make_web_search_tool
    from raydistill.sandbox import Sandbox

    tool = cloudpickle.loads(cloudpickle.dumps(make_web_search_tool(service)))  # shippable to sandbox hosts

    async def direct():
        return await asyncio.gather(tool("Evan Morris"), tool("Horatio Hale"))

    out = asyncio.run(direct())
    assert out[0].startswith("Retrieved documents:\n") and "===== Document 0, similarity: 0." in out[0]
    assert out[0].count("===== Document") == 3 and '"Evan Morris"' in out[0].split("===== Document 1")[0]
    with pytest.raises(TypeError, match="needs a string query"):
        asyncio.run(tool(42))
    assert make_web_search_tool(service, k=1, sync=True)("Horatio Hale").count("===== Document") == 1

    with Sandbox(tools={"web_search": tool}) as sb:
        r = sb.run('res = web_search("Evan Morris")\nprint(res[:400])\nlen(res)')
        assert r.error is None, r.error
        assert "Document 0, similarity" in r.stdout and "Evan Morris" in r.stdout
        r = sb.run("web_search(3)")
        assert r.error and "string query" in str(r.error)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_search_r1_shape(resp: httpx.Response, nq: int, k: int) -> None:
    assert resp.status_code == 200, resp.text
    result = resp.json()["result"]
    assert len(result) == nq and all(len(r) == k for r in result)
    for r in result:
        for item in r:
            assert set(item) == {"document", "score"} and set(item["document"]) == {"id", "contents"}
            assert isinstance(item["score"], float)
        assert [i["score"] for i in r] == sorted((i["score"] for i in r), reverse=True)


def test_http_retrieve_is_search_r1_compatible(service):
    import uvicorn

    from raydistill.actors.retriever import create_http_app, handle_search

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_http_app(handle_search(service), default_topk=3),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/retrieve", json={"queries": ["Evan Morris", "Horatio Hale"], "topk": 2,
                                               "return_scores": True})
            _check_search_r1_shape(r, 2, 2)
            top = r.json()["result"][0][0]["document"]
            assert top["id"] == "0" and top["contents"].startswith('"Evan Morris"')
            plain = client.post("/retrieve", json={"queries": ["Evan Morris"]}).json()["result"]
            assert len(plain[0]) == 3 and set(plain[0][0]) == {"id", "contents"}  # default topk, no scores
            assert client.post("/retrieve", json={"queries": "Evan Morris"}).status_code == 422
            assert client.post("/retrieve", json={"queries": ["a"], "topk": 0}).status_code == 422
            assert client.post("/retrieve", json={"queries": []}).json() == {"result": []}
            assert client.get("/health").json() == {"ok": True}
    finally:
        server.should_exit = True
        thread.join(10)


def test_serve_deployment_answers_retrieve(service):
    from ray import serve

    from raydistill.actors.retriever import retriever_deployment

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(retriever_deployment(service, default_topk=3), name="retriever", route_prefix="/")
        r = httpx.post(f"http://127.0.0.1:{port}/retrieve", json={"queries": ["Horatio Hale"], "topk": 3,
                                                                   "return_scores": True}, timeout=60)
        _check_search_r1_shape(r, 1, 3)
    finally:
        serve.shutdown()


def test_index_type_change_rebuilds_index_only(built):
    cfg, s = built
    hnsw = cfg.model_copy(update={"retrieval": cfg.retrieval.model_copy(update={"index_type": "hnsw"})})
    assert not index_stage.is_done(hnsw)
    out = index_stage.run(hnsw)
    assert out["shards_computed"] == 0 and out["index_type"] == "hnsw" and index_stage.is_done(hnsw)
    assert not index_stage.is_done(cfg)


def test_changed_precision_or_max_length_rebuilds(built):
    """Settings that shape the vectors make the index not done and recompute every shard; search-time ones don't."""
    cfg, s = built
    assert index_stage.run(cfg)["shards_computed"] == 0 and index_stage.is_done(cfg)  # back from other tests' types
    r = cfg.retrieval
    for update in ({"max_length": 64}, {"cpu_bf16": True}, {"index_type": "ivfpq", "pq_nbits": 4}):
        assert not index_stage.is_done(cfg.model_copy(update={"retrieval": r.model_copy(update=update)})), update
    for update in ({"nprobe": 4}, {"hnsw_ef_search": 16}, {"batch_size": 4}, {"top_k": 7}):
        assert index_stage.is_done(cfg.model_copy(update={"retrieval": r.model_copy(update=update)})), update
    bf16 = cfg.model_copy(update={"retrieval": r.model_copy(update={"cpu_bf16": True})})
    out = index_stage.run(bf16)
    assert out["shards_computed"] == s["shards"] and out["shards_reused"] == 0
    assert index_stage.is_done(bf16) and not index_stage.is_done(cfg)
    assert json.loads((Path(out["meta_path"])).read_text())["embedder"]["precision"] == "bfloat16"
