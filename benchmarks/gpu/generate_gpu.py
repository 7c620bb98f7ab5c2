"""The whole generate stage (Ray Data + teacher actor + sandbox actors) vs a bare AsyncLLM driver vs the
paper-style loop (4 episodes at a time), same episode shapes, one run, JSON to $OUT.

GPU (default): vLLM 0.26 with random weights of a real shape (default Qwen2.5-0.5B, load_format=dummy), the
agent-core benchmark's fixed-action mode (benchmarks/episodes.py: each step generates exactly `gen_tokens`
tokens, then the parser gets a valid code action, so every step really runs in a pooled sandbox; the
`web_search` tool sleeps 10 ms and returns text padded to `obs_tokens`), 5 steps, ~1,500-token first prompt
(the teacher prompt + a padded question), 200 generated + 100 observation tokens per step.

  stage: raydistill.stages.generate.generate_trajectories over >= 1,024 questions (Ray Data map_batches over
         one teacher actor holding the vLLM engine; sandboxes in SandboxPool actors; shards written by the
         actor). Timed from the first episode's start (engine start excluded) to the driver receiving the
         last batch (shard writes included). Filter + SFT build timed separately.
  bare:  benchmarks.episodes.run_bare straight on the same AsyncLLM, same prompts/shapes, 256 at a time.
  paper: the same bare loop, 4 episodes at a time (the reference's 4 workers).
One engine serves all three (as in benchmarks/episodes.py): the teacher actor runs bare and paper first,
inside its own event loop, before its first episode (so one ~150 s engine start fits the 10-minute device
call); the stage's window starts at its first episode. The prefix cache is reset before each variant.

    PYTHONUNBUFFERED=1 python benchmarks/gpu/generate_gpu.py --out $OUT          # GPU (device machine)
    python benchmarks/gpu/generate_gpu.py --cpu --out /tmp/x                      # tiny CPU run of the same code
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)

from benchmarks.gpu import cpus  # noqa: E402
from raydistill.actors.teacher import TeacherWorker  # noqa: E402

# -- instrumentation (runs inside the teacher actor) ----------------------------------------------------------
_IDLE_LEAVES = {"select", "poll", "epoll", "wait", "_wait_for_tstate_lock", "sleep", "get", "acquire", "accept",
                "recv", "read", "readinto", "_worker", "run_forever", "main_loop"}


def _where(frame, depth: int = 8) -> tuple[str, list[str]]:
    """(leaf 'file:func', up to `depth` frames leaf first) of a frame."""
    out = []
    f = frame
    while f is not None and len(out) < depth:
        c = f.f_code
        out.append(f"{os.path.basename(c.co_filename)}:{c.co_name}:{f.f_lineno}")
        f = f.f_back
    return (out[0] if out else "?"), out


def _loop_base_codes() -> set:
    """Code objects of the running loop thread's frames below its outermost coroutine (run_forever and its
    callers): a sample whose leaf is one of them is the loop waiting (uvloop polls in C, with no frame)."""
    import inspect

    frames = []
    f = sys._getframe(1)
    while f is not None:
        frames.append(f)
        f = f.f_back
    outer = max((i for i, fr in enumerate(frames) if fr.f_code.co_flags & inspect.CO_COROUTINE), default=None)
    return set() if outer is None else {fr.f_code for fr in frames[outer + 1:]}


class LoopProbe:
    """Explains where a window's time went on the process that runs the episodes AND vLLM's AsyncLLM output
    handler (they share one event loop):
      - loop lag: a task sleeping `tick_s` measures how late it wakes (p50/p99/max, share of time late);
      - a main-loop stack sampler (a thread reading sys._current_frames every `sample_s`): busy share of the
        loop thread and its hottest leaves / first raydistill-vllm frames / collapsed stacks; busy samples of
        the other Python threads (grading, Parquet writes, Ray Data's batch thread);
      - CPU seconds of the loop thread and of the whole process (frontend) vs wall;
      - garbage collections (gc.callbacks: count and pause per generation, longest pause): a collection holds
        the GIL, so the stack sampler cannot see it, but the loop stalls for its whole length;
      - stalls (the lag task woke >= `stall_s` late): how many, and the loop-thread stacks sampled inside them
        (none sampled: something held the GIL in C the whole time, e.g. a collection);
      - vLLM's own counters (prometheus registry in this process when log stats are on): prefix-cache
        queries/hits, preemptions, prompt/generation tokens, mean queue time / TTFT / inter-token latency.
    One window at a time: start(name) ... summary()."""

    def __init__(self, tick_s: float = 0.005, sample_s: float = 0.005, stall_s: float = 0.02) -> None:
        self.tick_s, self.sample_s, self.stall_s = tick_s, sample_s, stall_s
        self._task = None
        self._thread = None
        self._stop = None
        self.engine_core: int | None = None  # vLLM's engine core process (per-thread CPU, preemptions)

    def start(self, name: str) -> None:
        import collections
        import threading

        self.stop()
        self.name = name
        self.loop_tid = threading.get_ident()
        self.base_codes = _loop_base_codes()
        self.lags: list[float] = []
        self.samples = 0
        self.busy = 0
        self.leaf: collections.Counter = collections.Counter()
        self.first_own: collections.Counter = collections.Counter()
        self.stacks: collections.Counter = collections.Counter()
        self.threads: collections.Counter = collections.Counter()
        self.recent: collections.deque = collections.deque(maxlen=20_000)  # (time, stack) of busy loop samples
        self.stall_stacks: collections.Counter = collections.Counter()
        self.stalls = {"n": 0, "over_100ms": 0, "unsampled": 0, "ms": 0.0}
        self.t0 = time.perf_counter()
        self.cpu0 = os.times()
        try:
            self.clk = time.pthread_getcpuclockid(self.loop_tid)
            self.tcpu0 = time.clock_gettime(self.clk)
        except (AttributeError, OSError):
            self.clk = None
        self.vllm0 = vllm_counters()
        self.stat0 = _proc_stat()
        self.cpus0 = cpus.snapshot(self.engine_core)
        self.gc_pauses: list[tuple[int, float]] = []
        self._gc_t0 = 0.0
        gc.callbacks.append(self._gc)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="loop-probe", daemon=True)
        self._thread.start()
        self._task = asyncio.get_running_loop().create_task(self._lag())

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self._gc_t0:
            self.gc_pauses.append((info.get("generation", -1), time.perf_counter() - self._gc_t0))

    async def _lag(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            now = time.perf_counter()
            lag = now - t - self.tick_s
            self.lags.append(lag)
            if lag >= self.stall_s:
                start = t + self.tick_s
                inside = [st for ts, st in list(self.recent) if start <= ts <= now]
                self.stalls["n"] += 1
                self.stalls["ms"] += 1000 * lag
                self.stalls["over_100ms"] += lag >= 0.1
                self.stalls["unsampled"] += not inside
                for st in set(inside):
                    self.stall_stacks[st] += 1

    def _sample(self) -> None:
        import threading

        names = {}
        me = threading.get_ident()
        while not self._stop.wait(self.sample_s):
            frames = sys._current_frames()
            self.samples += 1
            for tid, fr in frames.items():
                if tid == me:
                    continue
                leaf, stack = _where(fr, 12 if tid == self.loop_tid else 1)  # other threads: leaf only (cheap)
                func = leaf.split(":")[1]
                idle = func in _IDLE_LEAVES
                if tid == self.loop_tid:
                    idle = idle or fr.f_code in self.base_codes  # uvloop idles in C under its run_forever caller
                    if idle:
                        continue
                    self.busy += 1
                    self.leaf[leaf] += 1
                    own = next((x for x in stack if not x.startswith(("asyncio", "events.py", "base_events.py",
                                                                      "threading.py"))), leaf)
                    self.first_own[own] += 1
                    self.stacks[" < ".join(stack[:6])] += 1
                    self.recent.append((time.perf_counter(), " < ".join(stack[:6])))
                elif not idle:
                    if tid not in names:
                        names = {t.ident: t.name for t in threading.enumerate()}
                    self.threads[f"{names.get(tid, tid)}: {leaf}"] += 1

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=1)
            self._stop = None

    def summary(self) -> dict:
        """The current window so far (does not stop it)."""
        wall = max(time.perf_counter() - self.t0, 1e-9)
        cpu = os.times()
        lags = sorted(self.lags)

        def q(p: float) -> float | None:
            return round(1000 * lags[min(len(lags) - 1, int(p * len(lags)))], 2) if lags else None

        n = max(self.samples, 1)

        def top(c, k=12):
            return [[k_, round(100 * v / n, 1)] for k_, v in c.most_common(k)]

        out = {
            "window": self.name, "wall_s": round(wall, 2),
            "loop_lag_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": q(1.0) if lags else None,
                            "ticks": len(lags), "late_share": round(sum(lags) / wall, 3) if lags else None},
            "loop_busy_share": round(self.busy / n, 3),
            "process_cpu_per_wall": round((cpu.user + cpu.system - self.cpu0.user - self.cpu0.system) / wall, 3),
            "top_leaf_pct": top(self.leaf), "top_first_own_frame_pct": top(self.first_own),
            "top_stacks_pct": top(self.stacks, 8), "other_threads_busy_pct": top(self.threads, 10),
        }
        out["stalls"] = {**self.stalls, "ms": round(self.stalls["ms"], 1), "at_least_ms": round(1000 * self.stall_s),
                         "top_stacks": [[k, v] for k, v in self.stall_stacks.most_common(8)]}
        pauses = list(self.gc_pauses)
        out["gc"] = {f"gen{g}": {"n": sum(1 for x, _ in pauses if x == g),
                                 "ms": round(1000 * sum(t for x, t in pauses if x == g), 1)} for g in (0, 1, 2)}
        out["gc"]["max_ms"] = round(1000 * max((t for _, t in pauses), default=0.0), 1)
        out["gc"]["share"] = round(sum(t for _, t in pauses) / wall, 4)
        if self.clk is not None:
            out["loop_thread_cpu_per_wall"] = round((time.clock_gettime(self.clk) - self.tcpu0) / wall, 3)
        out["vllm"] = vllm_delta(self.vllm0, vllm_counters())
        d = [b - a for a, b in zip(self.stat0, _proc_stat(), strict=True)]
        if d and sum(d) > 0:  # the whole machine: other processes (engine core, sandboxes, Ray) and VM steal
            busy = sum(d[0:3]) + sum(d[5:8])
            out["machine"] = {"busy_cores": round(busy / os.sysconf("SC_CLK_TCK") / wall, 2),
                              "busy_share": round(busy / sum(d), 3), "steal_share": round(d[7] / sum(d), 4)}
        out["cpus"] = cpus.delta(self.cpus0, cpus.snapshot(self.engine_core), wall)
        return out


def _proc_stat() -> list[int]:
    """Machine-wide CPU jiffies (user nice system idle iowait irq softirq steal), [] where unreadable."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def vllm_counters() -> dict:
    """vLLM's prometheus samples in this process, summed over labels ({} without vLLM or with stats off)."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return {}
    out: dict[str, float] = {}
    try:
        for metric in REGISTRY.collect():
            for smp in metric.samples:
                if smp.name.startswith("vllm:") and not smp.name.endswith(("_bucket", "_created")):
                    out[smp.name] = out.get(smp.name, 0.0) + float(smp.value)
    except Exception as e:  # instrumentation must never break the benchmark
        return {"error": f"{type(e).__name__}: {e}"}
    return out


def vllm_delta(a: dict, b: dict) -> dict:
    """Counter deltas of one window + the derived figures that explain a slow step."""
    if not b or "error" in b:
        return b
    d = {k: b[k] - a.get(k, 0.0) for k in b if k.endswith(("_total", "_sum", "_count"))}
    out: dict = {}
    qs, hits = d.get("vllm:prefix_cache_queries_total"), d.get("vllm:prefix_cache_hits_total")
    if qs:
        out["prefix_cache_hit_rate"] = round((hits or 0) / qs, 4)
    for k in ("vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
              "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        if k in d:
            out[k.removeprefix("vllm:")] = round(d[k])
    for k in sorted(d):
        if k.endswith("_sum"):
            base = k.removesuffix("_sum")
            cnt = d.get(base + "_count")
            if cnt:
                out["mean_" + base.removeprefix("vllm:")] = round(d[k] / cnt, 5)
    gauges = {k.removeprefix("vllm:"): v for k, v in b.items() if k in ("vllm:num_requests_running",
                                                                      "vllm:num_requests_waiting")}
    return {**out, **gauges}



class FakeWebSearch:
    """Picklable `web_search`: fixed latency, fixed output size (runs in the sandbox host actor)."""

    def __init__(self, text: str, latency_s: float) -> None:
        self.text, self.latency_s = text, latency_s

    async def __call__(self, query: str) -> str:
        await asyncio.sleep(self.latency_s)
        return self.text


def _memo_fixed_action():
    """FixedActionEngine whose padded action text is computed once per (code, token count): the stand-in for
    text a real model's tokens decode to (free in real runs: vLLM detokenizes), so the stage does not pay
    ~1 ms of tokenizer calls per step on its event loop that the bare driver never pays."""
    from raydistill.engines.fixed_action import FixedActionEngine

    class MemoFixedAction(FixedActionEngine):
        def _text(self, code: str, target_tokens: int) -> str:
            memo = self.__dict__.setdefault("_memo", {})
            key = (code, target_tokens)
            if key not in memo:
                memo[key] = super()._text(code, target_tokens)
            return memo[key]

    return MemoFixedAction


EXTRA_POOLS = {"same": {}, "nosnap": {"snapshots": False}, "hosts16": {"num_actors": 16}, "nice0": {"nice": 0}}
"""Sandbox pools the `actor_loop_<name>` variants use instead of the stage's (overrides of its config)."""


class BenchTeacher(TeacherWorker):
    """TeacherWorker whose engine is wrapped in fixed-action mode; logs each episode's wall-clock span, runs
    the bare/paper baselines (and any `extra` in-actor variants) on its engine before its first episode, and
    probes every window (LoopProbe) - the stage's window from its first episode, rewritten after each batch."""

    def __init__(self, *args, bench_steps: int, bench_gen_tokens: int, times_dir: str,
                 baselines: dict | None = None, pin: bool = False, **kwargs) -> None:
        self.bench_steps, self.bench_gen_tokens = bench_steps, bench_gen_tokens
        self.baselines = baselines
        self._baseline_lock: asyncio.Lock | None = None
        self._baselines_done = False
        self.times_dir = Path(times_dir)
        self.times_path = self.times_dir / f"{os.getpid()}-{time.time_ns()}.jsonl"
        self.times_path.parent.mkdir(parents=True, exist_ok=True)
        self.probe = LoopProbe()
        self._stage_probe_started = False
        self._after_done = False
        super().__init__(*args, **kwargs)
        with self.times_path.open("a") as f:
            f.write(json.dumps({"engine_ready": time.time()}) + "\n")
        self.probe.engine_core = cpus.engine_core_pid()
        # the engine's own placement (engine.pin_cpus: engine core and this actor on a CPU each); --pin also
        # moves every other process off them (cpus.Placement)
        self.engine_pin = getattr(self.raw_engine, "placement", None)
        self.placement = (cpus.Placement(self.probe.engine_core, os.getpid())
                          if pin and self.probe.engine_core else None)
        info = {"engine": self.engine_pin}
        if self.placement is not None:
            info["isolate"] = {"topology": self.placement.topology, **self.placement.apply()}
        self.pinned = bool((self.engine_pin or {}).get("pinned") or (info.get("isolate") or {}).get("pinned"))
        print(f"[pin] {json.dumps(info)}", flush=True)
        (self.times_dir / "placement.json").write_text(json.dumps(info))

    def _repin(self) -> dict:
        if self.placement is not None:
            return self.placement.apply()
        from raydistill.engines.cpu_pinning import pin_engine

        return pin_engine()

    def _create_engine(self, create_engine):
        from raydistill.engines.fixed_action import default_action

        wrapped = super()._create_engine(create_engine)  # IncrementalPromptEngine(raw) unless turned off
        self.raw_engine = getattr(wrapped, "inner", wrapped)
        return _memo_fixed_action()(wrapped, default_action(self.bench_steps, tool="web_search"),
                                 gen_tokens=self.bench_gen_tokens)

    async def _probed(self, name: str, coro) -> dict:
        self.probe.start(name)
        try:
            r = await coro
        finally:
            probe = self.probe.summary()
            self.probe.stop()
        r["probe"] = probe
        print(f"[probe] {name}: {json.dumps(probe)}", flush=True)
        return r

    async def _actor_loop(self, shape, n: int, conc: int, incremental: bool, on_loop: bool = False,
                          pool: str | None = None) -> dict:
        """The stage's per-episode path (run_one: pool sandbox, episode, grading) on this actor's loop,
        without Ray Data or Parquet: separates the episode work from the Ray Data machinery. on_loop: sandbox
        Ray calls submitted from the loop itself (the path before sandbox_pool.acall). pool: another sandbox
        pool of `EXTRA_POOLS` ("in_actor": sandboxes in this actor)."""
        from benchmarks.episodes import make_questions
        from raydistill.actors import sandbox_pool
        from raydistill.actors.teacher import IncrementalPromptEngine
        from raydistill.engines.fixed_action import default_action

        saved, saved_pool = self.engine, self.sandbox_pool
        if pool is not None:
            self.sandbox_pool = None if pool == "in_actor" else self.baselines["pools"][pool]
        mid = IncrementalPromptEngine(self.raw_engine) if incremental else self.raw_engine
        self.engine = _memo_fixed_action()(mid, default_action(self.bench_steps, tool="web_search"),
                                        gen_tokens=self.bench_gen_tokens)
        qs = make_questions(self.raw_engine.tokenizer, "teacher", ["web_search"], shape.prompt_tokens, n)
        expected = str(sum(range(1, shape.steps)))
        sem = asyncio.Semaphore(conc)
        before = self.raw_engine.stats().get("generated_tokens", 0)

        async def one(i: int):
            async with sem:
                return await self.run_one({"id": f"loop/{i}", "sample": 0, "question": qs[i], "gold": [expected],
                                           "domain": "math", "source": "bench"})

        async def direct(method, *args):
            return await method.remote(*args)

        helper = sandbox_pool.acall
        if on_loop:
            sandbox_pool.acall = direct
        try:
            t0 = time.perf_counter()
            trajs = await asyncio.gather(*(one(i) for i in range(n)))
            wall = time.perf_counter() - t0
        finally:
            self.engine, self.sandbox_pool = saved, saved_pool
            sandbox_pool.acall = helper
        gen = self.raw_engine.stats().get("generated_tokens", 0) - before
        steps = [s for t in trajs for s in t.steps]
        return dict(variant="actor_loop" + ("" if incremental else "_full_render") + ("_on_loop" if on_loop else "")
                    + (f"_{pool}" if pool else ""), episodes=n, concurrency=conc,
                    wall_s=round(wall, 3), episodes_per_s=round(n / wall, 3), gen_tokens=gen,
                    tok_s=round(gen / wall, 1),
                    ok_episodes=sum(1 for t in trajs if t.error is None and t.final_answer == expected),
                    gen_s_per_step=round(sum(s.gen_s for s in steps) / max(1, len(steps)), 4),
                    mean_exec_ms=round(1000 * sum(s.exec_s for s in steps) / max(1, len(steps)), 2))

    async def _variant(self, name: str, n: int, conc: int) -> dict:
        """Run one baseline/extra variant on this actor's engine (prefix cache reset first), probed and printed."""
        from benchmarks.episodes import Shape, run_bare

        inner = self.raw_engine
        shape = Shape(**self.baselines["shape"])
        await inner.reset_prefix_cache()
        base = name.removesuffix("_unpinned")  # <variant>_unpinned: that variant with every process on all CPUs
        if base in ("bare", "paper", "bare_detok", "bare_nosplice", "bare_again", "bare_after"):
            coro = run_bare(inner, shape, n, conc, role="teacher", name=name, detokenize=base == "bare_detok",
                            reuse_generated=base != "bare_nosplice")
        elif base == "actor_loop" or base.removeprefix("actor_loop_") in ("full_render", "on_loop", "in_actor",
                                                                          *EXTRA_POOLS):
            kind = base.removeprefix("actor_loop").removeprefix("_")
            coro = self._actor_loop(shape, n, conc, incremental=kind != "full_render", on_loop=kind == "on_loop",
                                    pool=kind if kind in ("in_actor", *EXTRA_POOLS) else None)
        else:
            raise ValueError(f"unknown extra variant {name!r}")
        unpin = base != name and self.pinned
        if unpin:
            print(f"[pin] {name}: {json.dumps(cpus.release())}", flush=True)
        try:
            r = await self._probed(name, coro)
        finally:
            if unpin:
                print(f"[pin] after {name}: {json.dumps(self._repin())}", flush=True)
        r["variant"] = name
        print(f"[variant] {json.dumps({k: v for k, v in r.items() if k != 'probe'})}", flush=True)
        return r

    async def _run_baselines(self) -> None:
        from raydistill.engines import ChatRequest, SamplingParams

        b = self.baselines
        inner = self.raw_engine
        warm = SamplingParams(max_tokens=8, ignore_eos=True)  # first requests (graphs, allocator) untimed
        await asyncio.gather(*(inner.generate(ChatRequest(prompt_token_ids=[100 + i] * 64), warm) for i in range(8)))
        plan = [("bare", b["episodes"], b["concurrency"])]
        if b["paper_episodes"]:
            plan.append(("paper", b["paper_episodes"], 4))
        plan += [(x, b["extra_episodes"], b["concurrency"]) for x in b.get("extra", []) if x != "bare_after"]
        runs = [await self._variant(name, n, conc) for name, n, conc in plan]
        await inner.reset_prefix_cache()
        self.phases = dict.fromkeys(self.phases, 0.0)  # the stage's phase sums start now
        self.episodes_run = 0
        ps = getattr(self.engine.inner, "counters", None)
        if isinstance(ps, dict):
            for k in ps:
                ps[k] = 0 if isinstance(ps[k], int) else 0.0
        Path(b["out"]).write_text(json.dumps(runs))

    async def __call__(self, batch):
        if self.baselines is not None and not self._baselines_done:
            if self._baseline_lock is None:
                self._baseline_lock = asyncio.Lock()
            async with self._baseline_lock:
                if not self._baselines_done:
                    await self._run_baselines()
                    self._baselines_done = True
        if not self._stage_probe_started:
            self._stage_probe_started = True
            self.probe.start("stage")
        out = await super().__call__(batch)
        # cumulative since the stage's first episode; the last batch's write is the whole stage
        snap = {"probe": self.probe.summary(), **self.phase_stats()}
        tmp = self.times_dir / f".probe-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(snap))
        os.replace(tmp, self.times_dir / f"probe-{os.getpid()}.json")
        b = self.baselines
        if (b is not None and "bare_after" in b.get("extra", []) and not self._after_done
                and self.episodes_run >= b["episodes"]):
            # the stage's last episode is done: bare once more on the same engine, bracketing the stage with
            # bare_again; its span is logged as excluded and subtracted from the stage's wall clock
            self._after_done = True
            t0 = time.time()
            r = await self._variant("bare_after", b["extra_episodes"], b["concurrency"])
            with self.times_path.open("a") as f:
                f.write(json.dumps({"excluded": [t0, time.time()]}) + "\n")
            Path(b["out"]).with_suffix(".after.json").write_text(json.dumps([r]))
        return out

    async def run_one(self, row):
        t0 = time.time()
        traj = await super().run_one(row)
        if not self._stage_probe_started:  # an in-actor variant before the stage
            return traj
        with self.times_path.open("a") as f:
            f.write(json.dumps({"start": t0, "end": time.time()}) + "\n")
        return traj


def build_config(args, model_dir: str, run_dir: Path, cpu: bool):
    from raydistill.config import RootConfig

    teacher = (dict(backend="transformers", model=model_dir, max_model_len=4096, max_batch_size=args.concurrency)
               if cpu else
               dict(backend="vllm", model=model_dir, load_format="dummy", dtype="bfloat16", max_model_len=8192,
                    gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                    enable_prefix_caching=True, num_gpus=1, pin_cpus=args.pin_cpus,
                    # vLLM's stat loggers on: the prometheus counters LoopProbe reads (prefix-cache hits,
                    # preemptions, queue time, inter-token latency) and the periodic "Prefix cache hit rate" log.
                    engine_kwargs={"disable_log_stats": not args.vllm_stats}))
    return RootConfig.model_validate({
        "run_dir": str(run_dir),
        "ray": {"address": "local"},
        "teacher": teacher,
        "student": {"model": model_dir},
        "agent": {"max_steps": args.steps, "max_new_tokens": args.gen_tokens, "temperature": 0.0, "ftp": False,
                  "observation_max_chars": 10**7},
        "retrieval": {"enabled": True},
        "sandbox": {"pool": {"num_actors": args.sandbox_actors, "num_cpus_per_actor": 0.25}},
        "generate": {"kinds": ["agent"], "num_workers": 1, "episodes_per_worker": args.concurrency,
                     "batch_size": args.batch_size, "shard_rows": 256, "flush_interval_s": 30,
                     "worker_num_cpus": 1, "progress_interval_s": 10},
        "sft": {"max_length": 16384},
    })


def run_stage(args, cfg, model_dir: str, shape, tok) -> dict:
    import ray

    from benchmarks.episodes import make_questions, make_tool_output
    from raydistill.actors.sandbox_pool import SandboxPool
    from raydistill.curation import TrajectoryStore
    from raydistill.stages import generate
    from raydistill.stages.ray_init import init_ray

    expected = str(sum(range(1, shape.steps)))  # default_action's final answer
    tool_text = make_tool_output(tok, shape.obs_tokens)
    questions = make_questions(tok, "teacher", ["web_search"], shape.prompt_tokens, args.episodes)
    rows = [{"id": f"bench/{i}", "sample": 0, "question": q, "gold": [expected], "domain": "math",
             "source": "bench"} for i, q in enumerate(questions)]
    init_ray(cfg.ray)
    pool = SandboxPool(cfg.sandbox)
    for _ in range(args.sandbox_actors):  # zygotes up (numpy/sympy imported) before timing
        pool.create_sync().close()
    tools = SimpleNamespace(sandbox_pool=None if args.in_actor_sandbox else pool,
                            web_search=FakeWebSearch(tool_text, shape.tool_s), close=lambda: None)
    times_dir = cfg.run_path / "bench_times"
    baselines_out = cfg.run_path / "baselines.json"
    extra_pools = {}
    for name, over in EXTRA_POOLS.items():
        if f"actor_loop_{name}" in {x.removesuffix("_unpinned") for x in args.extra}:
            over = dict(over)
            extra_pools[name] = SandboxPool(cfg.sandbox, num_actors=over.pop("num_actors", None), **over)
            for _ in extra_pools[name].actors:
                extra_pools[name].create_sync().close()
    baselines = {"pools": extra_pools, "episodes": args.episodes, "paper_episodes": args.paper_episodes, "concurrency": args.concurrency,
                 "shape": asdict(shape), "out": str(baselines_out), "extra": args.extra,
                 "extra_episodes": args.extra_episodes or args.episodes}
    t_call = time.time()
    gen = generate.generate_trajectories(
        cfg, "agent", rows, worker_cls=BenchTeacher, tools=tools,
        worker_kwargs={"bench_steps": shape.steps, "bench_gen_tokens": shape.gen_tokens, "times_dir": str(times_dir),
                       "baselines": baselines, "incremental_prompts": not args.full_render,
                       "grade_in_worker": not args.no_grade, "pin": args.pin})
    t_done = time.time()
    events = [json.loads(x) for p in times_dir.glob("*.jsonl") for x in p.read_text().splitlines()]
    starts = [e["start"] for e in events if "start" in e]
    ends = [e["end"] for e in events if "end" in e]
    ready = [e["engine_ready"] for e in events if "engine_ready" in e]
    trajs, dups = TrajectoryStore(cfg.run_path / "trajectories" / "agent").read()
    gen_tokens = sum(s.completion_tokens for t in trajs for s in t.steps)
    steps = [s for t in trajs for s in t.steps]
    excluded = sum(e["excluded"][1] - e["excluded"][0] for e in events if "excluded" in e)
    wall = t_done - min(starts) - excluded
    probes = [json.loads(p.read_text()) for p in times_dir.glob("probe-*.json")]
    t_post = time.perf_counter()
    post = generate.filter_and_build(cfg, "agent", rows)
    post_s = time.perf_counter() - t_post
    pool.shutdown()
    for p in extra_pools.values():
        p.shutdown()
    ray.shutdown()
    baseline_runs = json.loads(baselines_out.read_text())
    after = baselines_out.with_suffix(".after.json")
    if after.exists():
        baseline_runs += json.loads(after.read_text())
    placement = times_dir / "placement.json"
    return baseline_runs, dict(
        placement=json.loads(placement.read_text()) if placement.exists() else None,
        variant="stage", episodes=len(trajs), concurrency=args.concurrency, wall_s=round(wall, 3),
        episodes_per_s=round(len(trajs) / wall, 3), trajectories_per_s=round(len(trajs) / wall, 3),
        gen_tokens=gen_tokens, tok_s=round(gen_tokens / wall, 1),
        episode_span_s=round(max(ends) - min(starts), 3),
        tail_after_last_episode_s=round(t_done - max(ends) - excluded, 3), bare_after_excluded_s=round(excluded, 1),
        startup_and_baselines_s_excluded=round(min(starts) - t_call, 1), engine_ready_s_after_call=round(min(ready) - t_call, 1)
        if ready else None, teacher_restarts=max(0, len(ready) - 1),
        ok_episodes=sum(1 for t in trajs if t.error is None and t.final_answer == expected),
        duplicate_rows=dups, steps=len(steps), exec_errors=sum(s.exec_error for s in steps),
        parse_errors=sum(s.parse_error for s in steps),
        mean_exec_ms=round(1000 * sum(s.exec_s for s in steps) / max(1, len(steps)), 2),
        first_prompt_tokens=round(sum(t.steps[0].prompt_tokens for t in trajs if t.steps) / max(1, len(trajs))),
        errors=sorted({t.error for t in trajs if t.error})[:3],
        filter_sft_s=round(post_s, 2), passed=post["report"]["passed"], sft_examples=post["sft"]["count"],
        sft_mean_tokens=post["sft"]["stats"]["mean_tokens"], generation_summary=gen,
        gen_s_per_step=round(sum(s.gen_s for s in steps) / max(1, len(steps)), 4),
        settings={"incremental_prompts": not args.full_render, "grade_in_worker": not args.no_grade,
                  "sandboxes": "in teacher actor" if args.in_actor_sandbox else f"{args.sandbox_actors} pool actors"},
        probe=probes[0]["probe"] if len(probes) == 1 else [p["probe"] for p in probes],
        worker_phases=[{k: v for k, v in p.items() if k != "probe"} for p in probes],
    )


def diagnosis(runs: list[dict]) -> list[dict]:
    """One row per variant: the figures that say whether a slower step came from the frontend loop (lag,
    busy share, CPU) or from the GPU side (prefix-cache misses, preemptions, queueing, inter-token latency)."""
    rows = []
    for r in runs:
        p = r.get("probe")
        p = p[0] if isinstance(p, list) and p else p
        if not isinstance(p, dict):
            continue
        v = p.get("vllm") or {}
        rows.append({
            "variant": r["variant"], "tok_s": r["tok_s"], "gen_s_per_step": r.get("gen_s_per_step"),
            "lag_p50_ms": p["loop_lag_ms"]["p50"], "lag_p99_ms": p["loop_lag_ms"]["p99"],
            "lag_max_ms": p["loop_lag_ms"]["max"], "loop_busy": p["loop_busy_share"],
            "gc_max_ms": (p.get("gc") or {}).get("max_ms"), "gc_share": (p.get("gc") or {}).get("share"),
            "stalls": (p.get("stalls") or {}).get("n"), "stall_ms": (p.get("stalls") or {}).get("ms"),
            "loop_cpu": p.get("loop_thread_cpu_per_wall"), "proc_cpu": p["process_cpu_per_wall"],
            "prefix_hit": v.get("prefix_cache_hit_rate"), "preempt": v.get("num_preemptions_total"),
            "prompt_tok": v.get("prompt_tokens_total"), "itl_ms": round(1000 * v["mean_inter_token_latency_seconds"], 2)
            if v.get("mean_inter_token_latency_seconds") is not None else None,
            "queue_ms": round(1000 * v["mean_request_queue_time_seconds"], 1)
            if v.get("mean_request_queue_time_seconds") is not None else None,
            "mach_cores": (p.get("machine") or {}).get("busy_cores"),
            "steal": (p.get("machine") or {}).get("steal_share"),
            "ec_cores": ((p.get("cpus") or {}).get("engine_core") or {}).get("cores"),
            "ec_preempt_s": ((p.get("cpus") or {}).get("engine_core") or {}).get("preempted_per_s"),
        })
    return rows


def print_diagnosis(rows: list[dict], runs: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    print("diagnosis (loop = the actor's event loop, shared by episodes and vLLM's output handler):", flush=True)
    print("  " + " ".join(f"{c:>14}" for c in cols), flush=True)
    for row in rows:
        print("  " + " ".join(f"{str(row[c]):>14}" for c in cols), flush=True)
    for r in runs:
        p = r.get("probe")
        p = p[0] if isinstance(p, list) and p else p
        if isinstance(p, dict):
            print(f"  {r['variant']} hottest loop frames (% of samples): "
                  + "; ".join(f"{k} {v}" for k, v in p["top_first_own_frame_pct"][:6]), flush=True)
            if p["other_threads_busy_pct"]:
                print(f"  {r['variant']} other busy threads: "
                      + "; ".join(f"{k} {v}" for k, v in p["other_threads_busy_pct"][:4]), flush=True)
            c = p.get("cpus") or {}
            if c.get("top_procs"):
                print(f"  {r['variant']} busiest processes (cores): "
                      + "; ".join(f"{k} [{pid}] {v}" for k, pid, v in c["top_procs"][:6]), flush=True)
            if c.get("engine_core"):
                print(f"  {r['variant']} engine core threads (name, tid, cores, preempted/s): "
                      + "; ".join(str(t) for t in c["engine_core"]["threads"]), flush=True)
            st = p.get("stalls") or {}
            if st.get("n"):
                print(f"  {r['variant']} stalls >= {st['at_least_ms']} ms: {st['n']} ({st['over_100ms']} >= 100 ms, {st['ms']} ms in all, "
                      f"{st['unsampled']} with no loop sample inside); stacks inside: "
                      + "; ".join(f"{k.split(' < ')[0]} x{v}" for k, v in st["top_stacks"][:4]), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny CPU run (transformers engine, tiny model)")
    p.add_argument("--episodes", type=int, default=None, help="questions for stage and bare (GPU 1024, CPU 24)")
    p.add_argument("--paper-episodes", type=int, default=None, help="episodes of the 4-at-a-time loop")
    p.add_argument("--concurrency", type=int, default=None, help="episodes in flight (GPU 256, CPU 8)")
    p.add_argument("--batch-size", type=int, default=None, help="Ray Data batch (GPU 64, CPU 4)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--gen-tokens", type=int, default=None)
    p.add_argument("--obs-tokens", type=int, default=None)
    p.add_argument("--sandbox-actors", type=int, default=None)
    p.add_argument("--shape", default="qwen2.5-0.5b", help="GPU model shape (benchmarks/gpu/model_shapes.py)")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--run-dir", default="/tmp/raydistill-bench/generate-run")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for generate_gpu.json (default $OUT)")
    p.add_argument("--extra", default="", help="comma list of in-actor variants run after bare/paper, before the "
                   "stage, same engine: bare_detok (bare with vLLM detokenizing), bare_nosplice (bare re-prefilling "
                   "its generated blocks like a fixed-action transcript), actor_loop (the stage's episode "
                   "path, no Ray Data/Parquet), actor_loop_full_render (same, whole conversation re-tokenized), actor_loop_on_loop (same, "
                   "sandbox Ray calls submitted from the loop: the path before sandbox_pool.acall), actor_loop_in_actor "
                   "(sandboxes in the teacher actor), actor_loop_nosnap (a pool with sandbox snapshots off), "
                   "actor_loop_hosts16 (a pool of 16 host actors), actor_loop_nice0 (sandboxes at the host's "
                   "priority), actor_loop_same (a fresh pool with the stage's config: the control for the others), "
                   "bare_again (bare once more; list it last to run it right before the stage and show the engine's drift "
                   "within the run), bare_after (bare right after the stage's last episode, excluded from its wall "
                   "clock; with bare_again it brackets the stage)")
    p.add_argument("--pin", action="store_true", help="besides the engine's own placement (engine core and "
                   "teacher actor on a CPU each), every other process of this user moved off those CPUs "
                   "(benchmarks/gpu/cpus.py); extras named <variant>_unpinned run that variant with everyone on all CPUs")
    p.add_argument("--no-pin-cpus", dest="pin_cpus", action="store_false",
                   help="GPU: the engine's pin_cpus off (the OS places the engine core and the teacher actor)")
    p.add_argument("--extra-episodes", type=int, default=None, help="episodes per extra variant (default --episodes)")
    p.add_argument("--full-render", action="store_true", help="stage: old path, re-tokenize the whole conversation")
    p.add_argument("--no-grade", action="store_true", help="stage: no grading in the actor (the filter grades)")
    p.add_argument("--in-actor-sandbox", action="store_true", help="stage: sandboxes in the teacher actor, not the pool")
    p.add_argument("--no-vllm-stats", dest="vllm_stats", action="store_false",
                   help="GPU: keep vLLM's stat loggers off (no prefix-cache/preemption figures)")
    args = p.parse_args(argv)
    args.extra = [x for x in args.extra.split(",") if x]
    cpu = args.cpu
    d = dict(episodes=24, paper_episodes=8, concurrency=8, batch_size=4, steps=3, prompt_tokens=400, gen_tokens=16,
             obs_tokens=24, sandbox_actors=1) if cpu else \
        dict(episodes=1024, paper_episodes=64, concurrency=256, batch_size=64, steps=5, prompt_tokens=1500,
             gen_tokens=200, obs_tokens=100, sandbox_actors=4)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    from transformers import AutoTokenizer

    from benchmarks.episodes import Shape

    shape = Shape(steps=args.steps, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                  obs_tokens=args.obs_tokens, tool_s=0.01)
    if cpu:
        from raydistill.models import resolve_model

        model_dir = resolve_model("tiny:qwen2-tiny")
    else:
        from benchmarks.gpu.model_shapes import make_model_dir

        model_dir = str(make_model_dir(args.shape, args.model_dir or f"/tmp/raydistill-bench/{args.shape}"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = build_config(args, model_dir, run_dir, cpu)
    res: dict = {"mode": "cpu" if cpu else "gpu", "shape": asdict(shape), "model": "tiny:qwen2-tiny" if cpu
                 else args.shape, "episodes": args.episodes, "concurrency": args.concurrency,
                 "batch_size": args.batch_size, "sandbox_actors": args.sandbox_actors, "runs": []}
    if not cpu:
        import torch

        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "?"
    print(f"stage: {args.episodes} questions, {args.concurrency} episodes in flight, shape {asdict(shape)}", flush=True)
    baseline_runs, stage = run_stage(args, cfg, model_dir, shape, tok)
    res["runs"] = [stage, *baseline_runs]
    for r in res["runs"]:
        print(f"  {r['variant']:>6} conc={r['concurrency']:<4} episodes={r['episodes']:<5} {r['wall_s']:>8.2f}s "
              f"{r['episodes_per_s']:>8.2f} ep/s {r['tok_s']:>10.1f} tok/s"
              + (f"  ok={r['ok_episodes']}/{r['episodes']}" if "ok_episodes" in r else ""), flush=True)
    by = {r["variant"]: r for r in res["runs"]}
    res["stage_vs_bare"] = round(by["stage"]["tok_s"] / by["bare"]["tok_s"], 3)
    if "bare_again" in by:  # the engine's speed drifted within a run by more than the target's margin (s4)
        res["stage_vs_bare_again"] = round(by["stage"]["tok_s"] / by["bare_again"]["tok_s"], 3)
    if "bare_again" in by and "bare_after" in by:  # bracketed: linear drift cancels
        res["stage_vs_bracket"] = round(2 * by["stage"]["tok_s"] / (by["bare_again"]["tok_s"]
                                                                   + by["bare_after"]["tok_s"]), 3)
    res["stage_vs_paper"] = round(by["stage"]["tok_s"] / by["paper"]["tok_s"], 2) if "paper" in by else None
    res["diagnosis"] = diagnosis(res["runs"])
    print_diagnosis(res["diagnosis"], res["runs"])
    res["targets"] = {"stage_vs_bare": ">= 0.85", "stage_vs_paper": ">= 5"}
    res["python"] = platform.python_version()
    res["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if "stage_vs_bare_again" in res:
        print(f"stage/bare_again (bare right before the stage) = {res['stage_vs_bare_again']}", flush=True)
    if "stage_vs_bracket" in res:
        print(f"stage/mean(bare_again, bare_after) (bare right before and right after the stage) = "
              f"{res['stage_vs_bracket']}", flush=True)
    print(f"stage/bare = {res['stage_vs_bare']} (target >= 0.85); stage/paper = {res['stage_vs_paper']} "
          "(target >= 5)", flush=True)
    if args.out:
        out = Path(args.out) / f"generate_{res['mode']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}", flush=True)
    print("RESULT " + json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
