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
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raydistill.sandbox import Sandbox  # noqa: E402

IDLE_PYTHON_C_S = 0.012  # the issue's figure for `python -c` on this machine when idle
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
def proc_cpu(pid: int) -> float:
    """utime + stime of a live process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def step_cpu(n: int) -> tuple[float, float]:
    """CPU seconds per step spent on the critical path: (host process, interpreter process); snapshots off
    so that no background work is mixed in. CPU time is far less sensitive than latency to a busy machine."""
    sb = Sandbox(snapshots=False)
    sb.run("import numpy, sympy")
    pid = sb.isolation["pid"]
    time.sleep(0.2)
    h0, i0 = host_cpu(), proc_cpu(pid)
    for _ in range(n):
        sb.run(SNIPPET)
    h1, i1 = host_cpu(), proc_cpu(pid)
    sb.close()
    return (h1 - h0) / n, (i1 - i0) / n


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat): counts the background work too
    (snapshot forks, their registration and reaping), which per-process figures miss."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[0:3]) + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")


CPU_MODES = {"snapshot every step": {"replay_budget_s": 0}, "journaled (default)": {}, "snapshots off": {"snapshots": False}}


def step_machine_cpu(n: int, gap: float, **kw) -> float:
    """Machine CPU seconds per step at `gap` think time, minus the machine's idle draw over the same wall."""
    sb = Sandbox(**kw)
    sb.run("import numpy, sympy")
    time.sleep(0.3)
    c0, t0 = machine_cpu(), time.perf_counter()
    for _ in range(n):
        sb.run(SNIPPET)
        time.sleep(gap)
    time.sleep(0.3)  # the last snapshot's background work lands
    busy, wall = machine_cpu() - c0, time.perf_counter() - t0
    sb.close()
    c0 = machine_cpu()
    time.sleep(wall)
    return (busy - (machine_cpu() - c0)) / n


def settled_snapshot(sb: Sandbox, timeout: float = 30.0) -> int:
    """Wait until the background snapshot of sb's current state has registered; its pid. Polls sparingly:
    each look is a call into the hub, whose CPU the fork_cpu figures would otherwise count."""
    end = time.monotonic() + timeout
    time.sleep(0.05)
    while True:
        pid = sb.isolation["snapshot_pid"]
        if pid is not None or time.monotonic() > end:
            return pid
        time.sleep(0.05)


def fork_cpu(sb: Sandbox, n: int) -> tuple[float, float]:
    """CPU seconds per fork: (until the child is ready: host + parent interpreter + the child process,
    whole background included: also the parent's replacement snapshot and its registration)."""
    parent = sb.isolation["pid"]
    ready = total = 0.0
    for _ in range(n):
        settled_snapshot(sb)
        time.sleep(0.02)
        h0, p0 = host_cpu(), proc_cpu(parent)
        child = sb.fork()
        cpid = child.isolation["pid"]
        ready += host_cpu() - h0 + proc_cpu(parent) - p0 + proc_cpu(cpid)
        snap = settled_snapshot(sb)
        total += host_cpu() - h0 + proc_cpu(parent) - p0 + proc_cpu(cpid) + (proc_cpu(snap) if snap else 0.0)
        child.close()
    return ready / n, total / n


def time_forks(sb: Sandbox, n: int, before, width: int) -> list[float]:
    """Latency of n forks (`fork()`, or `fork_many(width)`), each after `before()`; children closed."""
    out = []
    for _ in range(n):
        before()
        t = time.perf_counter()
        kids = sb.fork_many(width) if width > 1 else [sb.fork()]
        out.append(time.perf_counter() - t)
        for c in kids:
            c.close()
    return out


def sandbox_starts(n: int, **kw) -> tuple[list[float], list[float]]:
    """(create -> ready, create -> first step done) per new sandbox, numpy+sympy imported in that step."""
    ready, first = [], []
    for _ in range(n):
        time.sleep(0.05)
        t = time.perf_counter()
        sb = Sandbox(**kw)
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


def measure(quick: bool) -> dict:
    k = 1 if quick else 3
    load0 = os.getloadavg()
    # warm the zygote (one-time per host process: imports numpy+sympy once)
    t = time.perf_counter()
    warm = Sandbox(replay_budget_s=0)  # a snapshot after every step: the fork rows below need one
    warm.ready()
    raw: dict = {"zygote_start_s": time.perf_counter() - t, "level": warm.isolation_level, "k": k}

    # baselines
    raw["python_c"] = timed(lambda: python_c(SNIPPET), 10 * k)
    raw["python_c_np"] = timed(lambda: python_c(NP_SNIPPET), 3 * k)
    raw["bare_exec"] = timed(bare_exec_factory(), 2000 * k)

    # steps in one sandbox
    warm.run("import numpy, sympy")
    raw["step_back_to_back"] = timed(lambda: warm.run(SNIPPET), 100 * k)
    raw["step_with_gap"] = timed(lambda: warm.run(SNIPPET), 50 * k, gap=0.02)
    nosnap = Sandbox(snapshots=False)
    nosnap.run("import numpy, sympy")
    raw["step_no_snapshots"] = timed(lambda: nosnap.run(SNIPPET), 100 * k)
    raw["step_no_snapshots_gap"] = timed(lambda: nosnap.run(SNIPPET), 50 * k, gap=0.02)
    nosnap.close()
    journaled = Sandbox()
    journaled.run("import numpy, sympy")
    raw["step_journaled_gap"] = timed(lambda: journaled.run(SNIPPET), 50 * k, gap=0.02)
    journaled.close()
    raw["step_cpu_host"], raw["step_cpu_interp"] = step_cpu(300 * k)
    raw["machine_cpu"] = {mode: min(step_machine_cpu(100 * k, 0.02, **kw) for _ in range(2))
                          for mode, kw in CPU_MODES.items()}
    raw["bare_exec_cpu"] = bare_cpu = time.process_time()
    step = bare_exec_factory()
    for _ in range(2000 * k):
        step()
    raw["bare_exec_cpu"] = (time.process_time() - bare_cpu) / (2000 * k)

    # forks
    warm.run("state = list(range(1000))")
    time.sleep(0.3)  # that step's snapshot registers

    def after_turn():  # as in use: the model's turn lies between a step and the forks it asks for
        settled_snapshot(warm)
        time.sleep(0.01)

    def after_step():  # worst case: fork the moment a step returns
        time.sleep(0.01)
        warm.run("state[0] += 1")

    raw["fork"] = time_forks(warm, 20 * k, after_turn, 1)
    raw["fork_after_step"] = time_forks(warm, 10 * k, after_step, 1)
    raw["fork_many4"] = time_forks(warm, 5 * k, after_turn, 4)
    raw["fork_cpu"], raw["fork_cpu_total"] = fork_cpu(warm, 10 * k)

    # new sandboxes
    raw["start_ready"], raw["start_first_step"] = sandbox_starts(10 * k)
    raw["start_cold"], _ = sandbox_starts(10 * k, warm_sandboxes=0)
    t = time.perf_counter()
    for _ in range(10 * k):
        s = Sandbox(warm_sandboxes=0)
        s.ready()
        s.close()
    raw["cold_starts_per_s"] = 10 * k / (time.perf_counter() - t)

    # 16 concurrent sandboxes
    raw["conc_steps"] = steps = 10 * k
    raw["conc16_wall"], raw["conc16_lat"] = asyncio.run(concurrent_sandboxes(16, steps, 0.0))
    raw["conc16_gap_wall"], raw["conc16_gap_lat"] = asyncio.run(concurrent_sandboxes(16, steps, 0.02))
    raw["conc16_python_c_wall"], raw["conc16_python_c_lat"] = asyncio.run(concurrent_python_c(SNIPPET, 16, 2 * k))
    raw["conc16_python_c_np_wall"], raw["conc16_python_c_np_lat"] = asyncio.run(
        concurrent_python_c(NP_SNIPPET, 16, 1))
    warm.close()
    raw["load"] = [load0[0], os.getloadavg()[0]]
    return raw


def render(raw: dict) -> str:
    pyc, pycnp, bare = raw["python_c"], raw["python_c_np"], raw["bare_exec"]
    gap, b2b, nosnap = raw["step_with_gap"], raw["step_back_to_back"], raw["step_no_snapshots"]
    ready, first, cold, forks = raw["start_ready"], raw["start_first_step"], raw["start_cold"], raw["fork"]
    lat16, lat16g, clat, clat_np = (raw["conc16_lat"], raw["conc16_gap_lat"], raw["conc16_python_c_lat"],
                                    raw["conc16_python_c_np_lat"])
    steps = raw["conc_steps"]
    floor = pct(bare, 50)
    rows = [
        ("baseline: python -c per step", pyc, ""),
        ("baseline: python -c + numpy,sympy", pycnp, ""),
        ("baseline: bare in-process exec", bare, "the floor, no isolation"),
        *([("sandbox step, journaled (the default), 20 ms think gap", raw["step_journaled_gap"],
            f"+{ms(pct(raw['step_journaled_gap'], 50) - floor)} ms over exec")] if "step_journaled_gap" in raw
          else []),
        ("sandbox step, snapshot after every step, 20 ms think gap", gap,
         f"+{ms(pct(gap, 50) - floor)} ms over exec; {pct(pyc, 50) / pct(gap, 50):.0f}x faster than python -c, "
         f"{pct(pycnp, 50) / pct(gap, 50):.0f}x than python -c + numpy,sympy"),
        ("sandbox step, snapshot after every step, back-to-back", b2b,
         f"+{ms(pct(b2b, 50) - floor)} ms over exec (waits for the previous step's snapshot fork)"),
        ("sandbox step, snapshots off", nosnap, f"+{ms(pct(nosnap, 50) - floor)} ms over exec"),
        *([("sandbox step, snapshots off, 20 ms think gap", raw["step_no_snapshots_gap"],
            f"+{ms(pct(raw['step_no_snapshots_gap'], 50) - floor)} ms over exec (waking idle CPUs: see below)")]
          if "step_no_snapshots_gap" in raw else []),
        ("new sandbox (numpy+sympy ready), from the pre-started pool", ready,
         f"vs {ms(pct(pycnp, 50))} ms python -c + numpy,sympy"),
        ("new sandbox, started on demand (warm_sandboxes=0)", cold,
         f"{raw['cold_starts_per_s']:.0f} starts/s sequential (start+close), "
         f"{pct(pycnp, 50) / pct(cold, 50):.0f}x faster than python -c + numpy,sympy"),
        ("new sandbox + first step (imports numpy, sympy)", first, ""),
        ("fork (state copy, e.g. sag candidate), after the model's turn", forks,
         (f"CPU time until the child is ready: {ms(raw['fork_cpu'])} ms" if "fork_cpu" in raw else "")
         + (f"; {ms(raw['fork_cpu_total'])} ms with the background re-snapshot" if "fork_cpu_total" in raw
            else "")),
        *([("fork the moment a step returns (waits for that step's snapshot)", raw["fork_after_step"],
            "worst case; agents fork after the model's turn")] if "fork_after_step" in raw else []),
        *([("4 forks in one call (`fork_many(4)`, sag candidates)", raw["fork_many4"],
            "one round trip to the interpreter")] if "fork_many4" in raw else []),
        ("16 concurrent sandboxes, per step", lat16, f"{16 * steps / raw['conc16_wall']:.0f} steps/s (back-to-back)"),
        ("16 concurrent sandboxes, 20 ms gaps", lat16g, f"{16 * steps / raw['conc16_gap_wall']:.0f} steps/s"),
        ("16 concurrent python -c", clat, f"{len(clat) / raw['conc16_python_c_wall']:.0f} steps/s"),
        ("16 concurrent python -c + numpy,sympy", clat_np,
         f"{len(clat_np) / raw['conc16_python_c_np_wall']:.1f} steps/s"),
    ]
    if "step_cpu_host" in raw:
        cpu = raw["step_cpu_host"] + raw["step_cpu_interp"]
        rows.insert(7 if "step_no_snapshots_gap" in raw else 6, ("sandbox step, CPU time on the critical path (host + interpreter)", [cpu],
                        f"host {ms(raw['step_cpu_host'])} + interpreter {ms(raw['step_cpu_interp'])} ms; "
                        f"bare exec {ms(raw['bare_exec_cpu'])} ms (CPU time, not latency)"))
    if "machine_cpu" in raw:
        mc = raw["machine_cpu"]
        base = mc["snapshot every step"]
        rows += [(f"machine CPU per step (all processes, 20 ms gaps): {mode}", [v],
                  f"{v / base:.2f}x of snapshot every step (CPU time, not latency)") for mode, v in mc.items()]
    header = (f"isolation level: {raw['level']}; zygote start (one-time, imports numpy+sympy): "
              f"{raw['zygote_start_s']:.2f} s; {os.cpu_count()} CPUs ({platform.machine()}), load average "
              f"{raw['load'][0]:.1f} -> {raw['load'][1]:.1f}; snippet: `sum(i * i for i in range(100))`")
    table = ["| measurement | p50 ms | p99 ms | notes |", "|---|---:|---:|---|"]
    table += [f"| {name} | {ms(pct(xs, 50))} | {ms(pct(xs, 99))} | {note} |" for name, xs, note in rows]
    over = pct(nosnap, 50) - floor
    targets = [
        "", f"Against the issue's targets (set on an idle machine, where the issue saw `python -c` at "
        f"{IDLE_PYTHON_C_S * 1e3:.0f} ms; in this run `python -c` took {ms(pct(pyc, 50))} ms, load average "
        f"{raw['load'][0]:.0f} -> {raw['load'][1]:.0f} on 2 cores):", "",
        "| target | measured in this run (p50) |", "|---|---|",
        f"| step overhead <= 2 ms over bare exec | {ms(over)} ms with snapshots off, "
        f"{ms(pct(gap, 50) - floor)} ms with snapshots and a 20 ms gap"
        + (f"; critical-path CPU {ms(raw['step_cpu_host'] + raw['step_cpu_interp'])} ms" if "step_cpu_host" in raw
           else "") + " |",
        f"| new sandbox, numpy+sympy ready, <= 30 ms | {ms(pct(ready, 50))} ms from the pre-started pool, "
        f"{ms(pct(cold, 50))} ms started on demand |",
        f"| fork <= 10 ms | {ms(pct(forks, 50))} ms after the model's turn"
        + (f" (CPU {ms(raw['fork_cpu'])} ms until ready, {ms(raw['fork_cpu_total'])} ms with the background "
           "re-snapshot)" if "fork_cpu_total" in raw else "")
        + (f"; {ms(pct(raw['fork_after_step'], 50))} ms the moment a step returns" if "fork_after_step" in raw
           else "") + " |",
    ]
    return header + "\n\n" + "\n".join(table + targets)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="rewrite the '## Sandbox' section of docs/benchmarks.md")
    ap.add_argument("--json", help="also write raw figures here")
    ap.add_argument("--from-json", help="render a table from raw figures saved by --json instead of measuring")
    args = ap.parse_args()
    raw = json.loads(Path(args.from_json).read_text()) if args.from_json else measure(args.quick)
    text = render(raw)
    print(text)
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(raw))
    if args.write_docs:
        write_docs(text)
    return 0


NOTES = """How to read this:
- Every latency here includes waiting for a CPU on a box whose load average was far above its 2 cores;
  compare rows with the baselines of the same run, and use the CPU-time figures (less sensitive to load) to
  judge the cost itself. The critical path of a step is one round trip hub thread -> interpreter -> hub
  thread; its CPU cost is the "critical path" row.
- By default cheap steps are journaled, not snapshotted (crash safety by replay: docs/sandbox.md), so a step
  costs no fork: compare the "machine CPU per step" rows, which count every process on the box. The rows
  "snapshot after every step" (`replay_budget_s=0`) show what a snapshot adds, and the fork rows need one.
- With a snapshot after every step the interpreter forks it *after* replying (1 ms later). The next
  step waits only for that fork to finish (a bare fork of a numpy+sympy process: 0.9 ms measured on this box
  when it was quieter, 1.1 ms in the issue), then pre-faults the pages the next step would otherwise copy
  (copy-on-write, ~130 page faults moved out of a small step). The fork and its faults cost CPU (several ms
  on a loaded box) that a saturated box takes from the next step too, which is why "20 ms think gap" sits
  between "snapshots off" and "back-to-back".
  Agent steps are seconds apart (the model generates in between), so in use the fork is off the critical
  path; `snapshots=False` removes it (a crash then restarts the interpreter empty).
- A fork hands the parent's current snapshot (already a forked, confined copy of the state) to the child and
  returns; the parent forks its replacement snapshot in the background. A fork that comes before that
  background work finished (right after a step or another fork) waits for it, which a loaded box stretches.
- After a pause (the "20 ms think gap" rows) a step is slower than back-to-back even with snapshots off: every
  hop on the critical path (caller thread -> hub thread -> interpreter -> hub thread -> caller) wakes a thread
  or process whose CPU went idle. Measured on this box at 20 ms gaps, snapshots off: caller -> hub 0.5 ms,
  hub -> interpreter 0.2 ms, the step itself 0.56 ms (0.16 ms when hot), interpreter -> hub 0.4 ms, hub ->
  caller 0.15-0.2 ms. Snapshots add ~0.35 ms spread over these (a socket pair and a passed descriptor per step,
  ~23 copy-on-write faults the pre-fault step does not cover). The interpreter waits 1 ms after replying before
  it forks the snapshot (`SNAPSHOT_DELAY_S`): forking at once competed for the 2 cores with the host threads
  delivering the result and made half of the gapped steps ~2 ms slower.
- New sandboxes normally come from the pre-started pool (`warm_sandboxes`): ready in a few ms. Started on
  demand, a sandbox costs three forks of the warm zygote (namespace creator, warden, interpreter) plus new
  user/pid/mount namespaces and three small tmpfs mounts; still numpy+sympy-ready, unlike `python -c`.
- 16 concurrent sandboxes are CPU-bound here: each step also pays its snapshot fork, and two cores are shared
  with everything else; throughput is still several times that of 16 concurrent `python -c` steps (and
  about a hundred times that of `python -c` with numpy and sympy).
"""


SANDBOX_DOC_START = "<!-- benchmarks/sandbox.py --write-docs: start -->"
SANDBOX_DOC_END = "<!-- benchmarks/sandbox.py --write-docs: end -->"


def replace_section(old: str, start: str, end: str, body: str) -> str:
    """`old` with everything from `start` to `end` (a heading, or a marker line) replaced by `body`."""
    i = old.find(start)
    if i < 0:
        return old.rstrip("\n") + "\n\n" + body
    j = old.find(end, i + len(start))
    if j < 0:
        return old[:i] + body
    if end.startswith("<!--"):
        j += len(end) + 1  # the end marker belongs to the section
    else:
        j += 1  # keep the next heading
    return old[:i] + body + old[j:]


def write_docs(text: str) -> None:
    """Rewrite the "## Sandbox" section of docs/benchmarks.md and the measured block of docs/sandbox.md."""
    path = REPO / "docs" / "benchmarks.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    section = ("## Sandbox\n\n`python benchmarks/sandbox.py` on the 2-core CPU dev box (shared with other jobs: see "
               "the load average). Baselines are measured in the same run.\n\n" + text + "\n\n" + NOTES + "\n")
    path.write_text(replace_section(old, "## Sandbox\n", "\n## ", section))
    print(f"wrote {path}")
    doc = REPO / "docs" / "sandbox.md"
    header, _, targets = text.partition("\nAgainst the issue's targets")
    block = (f"{SANDBOX_DOC_START}\n{header.splitlines()[0]}\n\nAgainst the issue's targets{targets}\n\n"
             f"Full table and how to read it: docs/benchmarks.md, section Sandbox.\n{SANDBOX_DOC_END}\n")
    if doc.exists():
        old = doc.read_text()
        if SANDBOX_DOC_START not in old:
            raise SystemExit(f"{doc} lacks the marker {SANDBOX_DOC_START!r}; add it where the figures belong")
        doc.write_text(replace_section(old, SANDBOX_DOC_START, SANDBOX_DOC_END, block))
        print(f"wrote {doc}")


if __name__ == "__main__":
    raise SystemExit(main())
