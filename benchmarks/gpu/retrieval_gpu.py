"""Retrieval at corpus scale on a GPU machine: exact search over >= 1M random 768-d unit vectors (e5-base-v2's
width), batched vs one query at a time.

Paths measured in one run:
- faiss-cpu IndexFlatIP (the paper's exact inner-product index; faiss-gpu is not available there);
- torch matmul + top-k on the GPU, fp16 and fp32 (raydistill's GPU exact path, `TorchFlatIndex`), with its
  agreement with faiss (recall@k of the GPU top-k against faiss' exact top-k);
- query embedding with a random-weight e5-base-shaped encoder (BERT-base: 12 layers, 768 wide; weights do not
  change the cost), fp16 on the GPU, and end to end (embed + GPU search) batched vs one at a time;
- passage embedding throughput at ~150 tokens per passage (a 100-word wiki-18 passage), fp16;
- optionally the full wiki-18 size (21M vectors, fp16, GPU only) when the GPU has the memory.

    python benchmarks/gpu/retrieval_gpu.py --out $OUT/retrieval_gpu.json        # on the GPU machine
    python benchmarks/gpu/retrieval_gpu.py --tiny                                # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _rate(n: int, s: float) -> float:
    return round(n / s, 2) if s > 0 else float("inf")


def _sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_unit(torch, n: int, d: int, device: str, dtype, seed: int, chunk: int = 1 << 18):
    """(n, d) unit vectors generated in chunks on `device` (fast on a GPU, no host round trip)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty((n, d), device=device, dtype=dtype)
    for i in range(0, n, chunk):
        x = torch.randn((min(chunk, n - i), d), generator=g, device=device, dtype=torch.float32)
        out[i:i + len(x)] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return out


def torch_topk(torch, xb, q, k: int, chunk: int = 1024):
    scores, ids = [], []
    for i in range(0, q.shape[0], chunk):
        s, j = torch.topk(q[i:i + chunk].to(xb.dtype) @ xb.T, k, dim=1)
        scores.append(s)
        ids.append(j)
    return torch.cat(scores), torch.cat(ids)


def time_single_vs_batched(fn_single, fn_batched, n_single: int, n_batched: int) -> dict:
    fn_single(0)
    fn_batched()  # warm up both paths
    t = time.perf_counter()
    for i in range(n_single):
        fn_single(i)
    single = _rate(n_single, time.perf_counter() - t)
    t = time.perf_counter()
    fn_batched()
    batched = _rate(n_batched, time.perf_counter() - t)
    return {"one_at_a_time_qps": single, "batched_qps": batched, "ratio": round(batched / single, 2),
            "single_queries": n_single, "batch": n_batched}


def bench_torch_search(torch, np, xb, q32, args, device: str, exact_ids) -> dict:
    out: dict = {}

    def single(i):
        torch_topk(torch, xb, q32[i:i + 1], args.k)
        _sync(torch, device)

    def batched():
        _, ids = torch_topk(torch, xb, q32, args.k)
        _sync(torch, device)
        out["ids"] = ids

    r = time_single_vs_batched(single, batched, args.single, args.queries)
    if exact_ids is not None:
        got = out["ids"].cpu().numpy()
        r["recall_vs_faiss"] = round(float(np.mean([len(set(a) & set(b)) / args.k
                                                     for a, b in zip(got, exact_ids, strict=True)])), 4)
    return r


def bench_encoder(torch, np, xb16, args, device: str) -> dict:
    """e5-base-shaped encoder (random weights): query embedding + search end to end, and passages/s."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    enc_dtype = torch.float16 if device == "cuda" else torch.float32
    cfg = BertConfig(hidden_size=args.dim, num_hidden_layers=2 if args.tiny else 12, num_attention_heads=12,
                     intermediate_size=4 * args.dim, vocab_size=30522)
    model = BertModel(cfg, add_pooling_layer=False).to(device=device, dtype=enc_dtype).eval()
    rng = np.random.default_rng(0)

    def embed(lengths):
        L = int(max(lengths))
        ids = torch.zeros((len(lengths), L), dtype=torch.long)
        mask = torch.zeros((len(lengths), L), dtype=torch.long)
        for j, n in enumerate(lengths):
            ids[j, :n] = torch.from_numpy(rng.integers(1000, 30000, n))
            mask[j, :n] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            v = (h * m).sum(1) / m.sum(1)
            return torch.nn.functional.normalize(v.float(), dim=-1)

    q_lengths = rng.integers(8, 24, args.queries)  # "query: " + a short question, in tokens

    def e2e_single(i):
        torch_topk(torch, xb16, embed(q_lengths[i:i + 1]), args.k)
        _sync(torch, device)

    def e2e_batched():
        for i in range(0, args.queries, 512):
            torch_topk(torch, xb16, embed(np.sort(q_lengths[i:i + 512])), args.k)
        _sync(torch, device)

    res = {"e2e_query_embed_plus_search": time_single_vs_batched(e2e_single, e2e_batched, args.single,
                                                                 args.queries)}
    print("end to end (embed + search):", res["e2e_query_embed_plus_search"], flush=True)

    p_lengths = np.sort(np.clip(rng.normal(150, 30, args.passages).astype(int), 40, 256))[::-1]
    bs = 512 if device == "cuda" else 16
    embed(p_lengths[:bs])
    _sync(torch, device)
    t = time.perf_counter()
    for i in range(0, len(p_lengths), bs):
        embed(p_lengths[i:i + bs])
    _sync(torch, device)
    s = time.perf_counter() - t
    res["passage_embedding"] = {"passages": len(p_lengths), "passages_per_s": _rate(len(p_lengths), s),
                                "batch": bs, "mean_tokens": float(p_lengths.mean()), "dtype": str(enc_dtype),
                                "wiki18_21M_hours_per_gpu": round(21_000_000 / (len(p_lengths) / s) / 3600, 2)}
    print("passage embedding:", res["passage_embedding"], flush=True)
    return res


def bench_full_scale(torch, args, device: str):
    """21M fp16 vectors (wiki-18's passage count) searched exactly on one GPU, when memory allows."""
    free, _ = torch.cuda.mem_get_info()
    need = args.full_n * args.dim * 2 + 256 * args.full_n * 2 * 2
    if need > 0.9 * free:
        return f"skipped: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free"
    xb = random_unit(torch, args.full_n, args.dim, device, torch.float16, seed=2)
    q = random_unit(torch, args.queries, args.dim, device, torch.float32, seed=3)

    def single(i):
        torch_topk(torch, xb, q[i:i + 1], args.k)
        _sync(torch, device)

    def batched():
        torch_topk(torch, xb, q, args.k, chunk=256)
        _sync(torch, device)

    r = time_single_vs_batched(single, batched, 20, args.queries)
    r["n"] = args.full_n
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="corpus vectors")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=1024, help="batched query count")
    ap.add_argument("--single", type=int, default=100, help="queries timed one at a time (GPU paths)")
    ap.add_argument("--faiss-single", type=int, default=20, help="queries timed one at a time (faiss-cpu)")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--passages", type=int, default=20_000, help="passages embedded for passages/s")
    ap.add_argument("--full-n", type=int, default=21_000_000, help="GPU-only fp16 scale test (0 = skip)")
    ap.add_argument("--tiny", action="store_true", help="small sizes; runs on a CPU in a minute")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/retrieval_gpu.json when $OUT is set)")
    args = ap.parse_args()
    if args.tiny:
        args.n, args.queries, args.single, args.faiss_single, args.passages, args.full_n = 20_000, 64, 8, 8, 64, 0

    import numpy as np
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "n": args.n,
                 "dim": args.dim, "k": args.k, "torch": torch.__version__, "cpus": os.cpu_count()}
    print(f"device {res['device']}: {args.n} x {args.dim} vectors", flush=True)

    t = time.perf_counter()
    xb32 = random_unit(torch, args.n, args.dim, device, torch.float32, seed=0)
    q32 = random_unit(torch, args.queries, args.dim, device, torch.float32, seed=1)
    _sync(torch, device)
    res["generate_s"] = round(time.perf_counter() - t, 2)

    # ---- faiss-cpu exact inner product
    try:
        import faiss

        xb_np = xb32.cpu().numpy()
        q_np = q32.cpu().numpy()
        index = faiss.IndexFlatIP(args.dim)
        t = time.perf_counter()
        index.add(xb_np)
        add_s = time.perf_counter() - t
        exact_ids = None

        def faiss_single(i):
            index.search(q_np[i:i + 1], args.k)

        def faiss_batched():
            nonlocal exact_ids
            _, exact_ids = index.search(q_np, args.k)

        r = time_single_vs_batched(faiss_single, faiss_batched, args.faiss_single, args.queries)
        r.update(add_s=round(add_s, 2), threads=faiss.omp_get_max_threads(), version=faiss.__version__)
        res["faiss_cpu_flat"] = r
        print("faiss-cpu flat:", r, flush=True)
        del xb_np
    except ImportError:
        exact_ids = None
        res["faiss_cpu_flat"] = "faiss not installed"

    # ---- torch exact top-k (GPU exact path), fp16 and fp32
    for name, dtype in (("torch_fp16", torch.float16), ("torch_fp32", torch.float32)):
        if dtype == torch.float16 and device == "cpu":
            continue
        res[name] = bench_torch_search(torch, np, xb32.to(dtype), q32, args, device, exact_ids)
        print(f"{name}:", res[name], flush=True)
    xb16 = xb32.to(torch.float16) if device == "cuda" else xb32
    del xb32
    if device == "cuda":
        torch.cuda.empty_cache()
    res.update(bench_encoder(torch, np, xb16, args, device))
    del xb16
    if device == "cuda" and args.full_n:
        torch.cuda.empty_cache()
        res["torch_fp16_full_wiki18_scale"] = bench_full_scale(torch, args, device)
        print("full scale:", res["torch_fp16_full_wiki18_scale"], flush=True)

    out = args.out or (os.path.join(os.environ["OUT"], "retrieval_gpu.json") if os.environ.get("OUT") else None)
    print(json.dumps(res, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
