"""Sandbox benchmark: starts/s, step latency, fork latency, 16 concurrent sandboxes -- each figure next to
baselines measured in the same run:

  * python -c      a fresh `python -c <snippet>` subprocess per step (what simple agent stacks do)
  * python -c +np  the same, with `import numpy, sympy` (what agent code does)
  * exec           bare in-process exec of the snippet (the floor; no isolation at all)

    python benchmarks/sandbox.py                 # full run, prints a table
    python benchmarks/sandbox.py --quick         # fewer iterations
    python benchmarks/sandbox.py --write-docs    # also (re)writes the "## Sandbox" section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raydistill.sandbox import Sandbox  # noqa: E402

SNIPPET = "acc = sum(i * i for i in range(100))\nacc"
NP_SNIPPET = "import numpy, sympy\n" + SNIPPET


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def ms(x: float) -> str:
    return f"{x * 1e3:.2f}" if x < 0.1 else f"{x * 1e3:.0f}"


def timed(fn, n: int, gap: float = 0.0) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        if gap:
            time.sleep(gap)
    return out


# -- baselines -----------------------------------------------------------------------------------------
def python_c(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)


def bare_exec_factory():
    ns: dict = {}

    def step():
        exec(compile(SNIPPET, "<code>", "exec"), ns)

    return step


async def concurrent_python_c(code: str, n_boxes: int, steps: int) -> tuple[float, list[float]]:
    lat: list[float] = []

    async def one():
        for _ in range(steps):
            t = time.perf_counter()
            p = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.DEVNULL)
            await p.wait()
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n_boxes)))
    return time.perf_counter() - t0, lat


# -- sandbox -------------------------------------------------------------------------------------------
def sandbox_starts(n: int) -> tuple[list[float], list[float]]:
    """(create -> ready, create -> first step done) per new sandbox, numpy+sympy imported in that step."""
    ready, first = [], []
    for _ in range(n):
        t = time.perf_counter()
        sb = Sandbox()
        sb.ready()
        ready.append(time.perf_counter() - t)
        r = sb.run("import numpy, sympy\n1")
        assert r.ok, r
        first.append(time.perf_counter() - t)
        sb.close()
    return ready, first


async def concurrent_sandboxes(n_boxes: int, steps: int, gap: float) -> tuple[float, list[float]]:
    boxes = [Sandbox() for _ in range(n_boxes)]
    await asyncio.gather(*(b.aready() for b in boxes))
    await asyncio.gather(*(b.arun("import numpy, sympy") for b in boxes))
    lat: list[float] = []

    async def one(b: Sandbox):
        for _ in range(steps):
            t = time.perf_counter()
            r = await b.arun(SNIPPET)
            assert r.ok, r
            lat.append(time.perf_counter() - t)
            if gap:
                await asyncio.sleep(gap)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(b) for b in boxes))
    wall = time.perf_counter() - t0
    await asyncio.gather(*(b.aclose() for b in boxes))
    return wall, lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="rewrite the '## Sandbox' section of docs/benchmarks.md")
    ap.add_argument("--json", help="also write raw figures here")
    args = ap.parse_args()
    k = 1 if args.quick else 3
    load0 = os.getloadavg()

    # warm the zygote (one-time per host process: imports numpy+sympy once)
    t = time.perf_counter()
    warm = Sandbox()
    warm.ready()
    zygote_s = time.perf_counter() - t
    level = warm.isolation_level

    rows: list[tuple[str, str, str, str]] = []  # (what, p50, p99, note)
    raw: dict = {"level": level, "zygote_start_s": zygote_s}

    # baselines
    pyc = timed(lambda: python_c(SNIPPET), 10 * k)
    pycnp = timed(lambda: python_c(NP_SNIPPET), 3 * k)
    bare = timed(bare_exec_factory(), 2000 * k)
    raw.update(python_c=pyc, python_c_np=pycnp, bare_exec=bare)

    # steps in one sandbox
    warm.run("import numpy, sympy")
    b2b = timed(lambda: warm.run(SNIPPET), 100 * k)
    gap = timed(lambda: warm.run(SNIPPET), 50 * k, gap=0.02)
    nosnap = Sandbox(snapshots=False)
    nosnap.run("import numpy, sympy")
    nosnap_steps = timed(lambda: nosnap.run(SNIPPET), 100 * k)
    nosnap.close()
    raw.update(step_back_to_back=b2b, step_with_gap=gap, step_no_snapshots=nosnap_steps)

    # forks
    forks: list[float] = []
    warm.run("state = list(range(1000))")
    for _ in range(20 * k):
        t = time.perf_counter()
        child = warm.fork()
        forks.append(time.perf_counter() - t)
        child.close()
        time.sleep(0.01)
    raw["fork"] = forks

    # new sandboxes
    ready, first = sandbox_starts(10 * k)
    raw.update(start_ready=ready, start_first_step=first)

    # 16 concurrent sandboxes
    steps = 10 * k
    wall16, lat16 = asyncio.run(concurrent_sandboxes(16, steps, 0.0))
    wall16g, lat16g = asyncio.run(concurrent_sandboxes(16, steps, 0.02))
    cwall, clat = asyncio.run(concurrent_python_c(SNIPPET, 16, 2 * k))
    cwall_np, clat_np = asyncio.run(concurrent_python_c(NP_SNIPPET, 16, 1))
    raw.update(conc16_wall=wall16, conc16_lat=lat16, conc16_gap_wall=wall16g, conc16_gap_lat=lat16g,
               conc16_python_c_wall=cwall, conc16_python_c_lat=clat, conc16_python_c_np_wall=cwall_np,
               conc16_python_c_np_lat=clat_np)
    warm.close()
    load1 = os.getloadavg()

    floor = statistics.median(bare)
    rows += [
        ("baseline: python -c per step", ms(pct(pyc, 50)), ms(pct(pyc, 99)), ""),
        ("baseline: python -c + numpy,sympy", ms(pct(pycnp, 50)), ms(pct(pycnp, 99)), ""),
        ("baseline: bare in-process exec", ms(pct(bare, 50)), ms(pct(bare, 99)), "the floor, no isolation"),
        ("sandbox step, 20 ms think gap", ms(pct(gap, 50)), ms(pct(gap, 99)),
         f"+{ms(pct(gap, 50) - floor)} ms over exec; {pct(pyc, 50) / pct(gap, 50):.0f}x faster than python -c, "
         f"{pct(pycnp, 50) / pct(gap, 50):.0f}x than python -c + numpy,sympy"),
        ("sandbox step, back-to-back", ms(pct(b2b, 50)), ms(pct(b2b, 99)),
         f"+{ms(pct(b2b, 50) - floor)} ms over exec (waits for the previous step's snapshot fork)"),
        ("sandbox step, snapshots off", ms(pct(nosnap_steps, 50)), ms(pct(nosnap_steps, 99)),
         f"+{ms(pct(nosnap_steps, 50) - floor)} ms over exec"),
        ("new sandbox (numpy+sympy ready)", ms(pct(ready, 50)), ms(pct(ready, 99)),
         f"{1 / statistics.mean(ready):.0f} starts/s sequential; vs {ms(pct(pycnp, 50))} ms python -c + numpy,sympy"),
        ("new sandbox + first step (imports numpy, sympy)", ms(pct(first, 50)), ms(pct(first, 99)), ""),
        ("fork (state copy, e.g. sag candidate)", ms(pct(forks, 50)), ms(pct(forks, 99)), ""),
        ("16 concurrent sandboxes, per step", ms(pct(lat16, 50)), ms(pct(lat16, 99)),
         f"{16 * steps / wall16:.0f} steps/s (back-to-back)"),
        ("16 concurrent sandboxes, 20 ms gaps", ms(pct(lat16g, 50)), ms(pct(lat16g, 99)),
         f"{16 * steps / wall16g:.0f} steps/s"),
        ("16 concurrent python -c", ms(pct(clat, 50)), ms(pct(clat, 99)), f"{len(clat) / cwall:.0f} steps/s"),
        ("16 concurrent python -c + numpy,sympy", ms(pct(clat_np, 50)), ms(pct(clat_np, 99)),
         f"{len(clat_np) / cwall_np:.1f} steps/s"),
    ]
    header = (f"isolation level: {level}; zygote start (one-time, imports numpy+sympy): {zygote_s:.2f} s; "
              f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average "
              f"{load0[0]:.1f} -> {load1[0]:.1f}; snippet: `sum(i * i for i in range(100))`")
    table = ["| measurement | p50 ms | p99 ms | notes |", "|---|---:|---:|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = header + "\n\n" + "\n".join(table)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw))
    if args.write_docs:
        write_docs(text)
    return 0


def write_docs(text: str) -> None:
    path = REPO / "docs" / "benchmarks.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    section = ("## Sandbox\n\n`python benchmarks/sandbox.py` on the 2-core CPU dev box (shared with other jobs: see "
               "the load average). Baselines are measured in the same run.\n\n" + text + "\n")
    start = old.find("## Sandbox\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + section
    else:
        nxt = old.find("\n## ", start + 1)
        new = old[:start] + section + (old[nxt + 1:] if nxt >= 0 else "")
    path.write_text(new)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
