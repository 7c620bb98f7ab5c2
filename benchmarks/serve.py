"""Load test for the student endpoint: throughput and latency of /v1/solve under concurrent clients.

Against a running endpoint:
    python benchmarks/serve.py --url http://127.0.0.1:8000 --concurrency 1 8 32 --requests 64
Or start the Serve app here first (local Ray, tiny CPU model by default):
    python benchmarks/serve.py --config configs/local.yaml --concurrency 1 8 --requests 16 serve.port=8011

Writes one JSON object (per concurrency level: requests/s, steps/s, latency p50/p95/max, errors, sag survivors)
to --out (default stdout). Traffic goes only to the given URL; keep it on 127.0.0.1 unless you mean otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    ("What is 17 * 23?", "math"),
    ("Who wrote the novel that the film Blade Runner is based on?", "qa"),
    ("Compute the sum of the first 50 positive integers.", "math"),
    ("In which country is the city of Porto?", "qa"),
]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


async def load(url: str, *, concurrency: int, requests: int, body: dict[str, Any] | None = None,
               api_key: str | None = None, timeout_s: float = 900.0) -> dict[str, Any]:
    """`requests` POST /v1/solve calls with at most `concurrency` in flight; returns throughput and latency."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    steps = survived = candidates = 0
    errors: dict[str, int] = {}

    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int) -> None:
            nonlocal steps, survived, candidates
            q, domain = QUESTIONS[i % len(QUESTIONS)]
            payload = {"question": q, "domain": domain, **(body or {})}
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/solve", json=payload)
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    return
                dt = time.perf_counter() - t0
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                return
            data = r.json()
            lat.append(dt)
            steps += data["timings"]["num_steps"]
            if data.get("sag"):
                survived += data["sag"]["survived_total"]
                candidates += data["sag"]["candidates_total"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    ok = len(lat)
    return {"concurrency": concurrency, "requests": requests, "ok": ok, "errors": errors,
            "wall_s": round(wall, 3), "requests_per_s": round(ok / wall, 3) if wall else None,
            "steps_per_s": round(steps / wall, 3) if wall else None, "avg_steps": round(steps / ok, 3) if ok else None,
            "latency_s": {"p50": _pct(lat, 0.5), "p95": _pct(lat, 0.95), "max": _pct(lat, 1.0),
                          "mean": round(statistics.fmean(lat), 4) if lat else None},
            "sag_survived": survived, "sag_candidates": candidates}


def main(argv: list[str] | None = None) -> int:
    from raydistill.config import load_config, split_overrides

    overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running endpoint; default: start the Serve app from --config here")
    p.add_argument("--config", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--sag-n", type=int, default=0, help="ask for sag with this many candidates (0: off)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--api-key-env", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(rest)
    started = False
    url = args.url
    if url is None:
        from raydistill.stages import serve as serve_stage

        cfg = load_config(args.config, overrides)
        url = serve_stage.run(cfg)["url"]
        started = True
    body: dict[str, Any] = {}
    if args.sag_n:
        body["sag"] = {"n": args.sag_n}
    if args.max_steps:
        body["max_steps"] = args.max_steps
    if args.max_new_tokens:
        body["max_new_tokens"] = args.max_new_tokens
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    try:
        levels = [asyncio.run(load(url, concurrency=c, requests=args.requests, body=body, api_key=key))
                  for c in args.concurrency]
    finally:
        if started:
            from ray import serve

            serve.shutdown()
    result = {"url": url, "body": body, "levels": levels}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
