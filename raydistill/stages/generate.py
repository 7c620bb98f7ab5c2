"""`raydistill generate`: teacher trajectories on Ray Data -> grading + filtering -> SFT data, per kind.

    questions (data.train_sets, data.limit) x samples_per_question
      -> Ray Dataset of (id, sample) rows, minus the keys already on disk (resume)
      -> map_batches over an actor pool of TeacherWorker (one engine each; tools on actor pools)
      -> <run_dir>/trajectories/<kind>/part-*.parquet     (written by the workers, atomically)
      -> <run_dir>/filter/<kind>/report.json + trajectories.parquet (graded, `rejected` set)
      -> <run_dir>/sft/<kind>/part-*.parquet + meta.json

Kinds: `agent` (code-acting episodes) and `cot` (the CoT-distillation baseline: one reasoning answer).
Rerunning with the same config does only what is missing; a run killed at any point resumes without
redoing or duplicating finished (id, sample) rows. Trajectories made under other generation settings are
not mixed in: the stage stops and names the changed keys (or, with generate.on_config_change=rerun, moves
them aside and starts over).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raydistill.config import RootConfig
from raydistill.curation.filter import apply_filter
from raydistill.curation.store import TrajectoryStore, write_table

log = logging.getLogger(__name__)

KINDS = ("agent", "cot")
SETTINGS_FILE = "settings.json"

# Engine fields that change speed or placement, not what is generated.
_ENGINE_RUNTIME_FIELDS = {
    "tensor_parallel_size", "gpu_memory_utilization", "enable_prefix_caching", "max_num_seqs", "max_batch_size",
    "batch_wait_ms", "max_concurrency", "request_timeout_s", "max_retries", "num_gpus", "num_cpus",
    "enforce_eager", "api_key_env",
}


class StageError(RuntimeError):
    """The stage cannot proceed (changed settings, missing inputs); the message says what to do."""


# -- settings, fingerprints, paths -------------------------------------------------------------------------
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def uses_web_search(cfg: RootConfig) -> bool:
    return bool(cfg.retrieval.enabled and cfg.agent.web_search)


def generation_settings(cfg: RootConfig, kind: str) -> dict[str, Any]:
    """Everything the trajectories of `kind` depend on (not the question selection: adding questions
    resumes; not resources: more workers or GPUs resume)."""
    teacher = {k: v for k, v in cfg.teacher.model_dump().items() if k not in _ENGINE_RUNTIME_FIELDS}
    if cfg.teacher.backend != "scripted":
        teacher.pop("script", None)
    agent = cfg.agent.model_dump()
    if not cfg.agent.sag.enabled:
        agent.pop("sag")
    g = cfg.generate
    s: dict[str, Any] = {"kind": kind, "seed": cfg.seed, "teacher": teacher,
                         "samples_per_question": g.samples_per_question}
    if g.samples_per_question > 1:
        s["sample_temperature"] = g.sample_temperature
    if kind == "cot":
        s["agent"] = {k: agent[k] for k in ("temperature", "top_p", "max_new_tokens")}
        s["cot_max_new_tokens"] = g.cot_max_new_tokens
    else:
        s["agent"] = agent
        s["sandbox"] = cfg.sandbox.model_dump()
        if uses_web_search(cfg):
            r = cfg.retrieval
            s["retrieval"] = {"corpus": r.corpus, "embedder": r.embedder, "index_type": r.index_type,
                              "index_dir": r.index_dir, "top_k": r.top_k}
    return s


def kind_dirs(cfg: RootConfig, kind: str) -> dict[str, Path]:
    root = cfg.run_path
    return {"trajectories": root / "trajectories" / kind, "filter": root / "filter" / kind,
            "sft": root / "sft" / kind}


def question_rows(cfg: RootConfig) -> list[dict[str, Any]]:
    """One row per (question, sample index), in data order."""
    from raydistill.data.loaders import load_sets

    records = load_sets(cfg.data.train_sets, strict=cfg.data.strict, limit=cfg.data.limit)
    if not records:
        raise StageError(f"no training questions in data.train_sets={cfg.data.train_sets}")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, c in Counter(ids).items() if c > 1)
        raise StageError(f"question ids occur twice in data.train_sets={cfg.data.train_sets} (a set listed twice?): "
                         f"{dup[:3]}")
    rows = []
    for r in records:
        gold = list(r.answer) if isinstance(r.answer, list) else [r.answer]
        for s in range(cfg.generate.samples_per_question):
            rows.append({"id": r.id, "sample": s, "question": r.question, "gold": gold, "domain": r.domain,
                         "source": r.source})
    return rows


def downstream_fingerprint(cfg: RootConfig, kind: str, keys: list[tuple[str, int]]) -> str:
    """Identifies the filter + SFT output: generation settings, the exact key set, filter and SFT settings."""
    g, sft = cfg.generate, cfg.sft
    return _sha({
        "generation": _sha(generation_settings(cfg, kind)),
        "keys": _sha(sorted(keys)),
        "filter": {"max_correct_per_question": g.max_correct_per_question, "keep_all": g.keep_all_for_smoke},
        "sft": sft.model_dump(),
        "student_tokenizer": cfg.student.tokenizer or cfg.student.model,
    })


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def changed_settings(cfg: RootConfig, kind: str) -> list[str]:
    """Settings that differ from those the existing trajectories of `kind` were made with ([] if none/new)."""
    p = kind_dirs(cfg, kind)["trajectories"] / SETTINGS_FILE
    if not p.exists():
        return []
    return _diff(json.loads(p.read_text()), json.loads(json.dumps(generation_settings(cfg, kind), default=str)))


def _move_aside(paths: list[Path]) -> list[str]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for p in paths:
        if p.exists():
            dest = p.with_name(f"{p.name}.stale-{stamp}")
            shutil.move(str(p), str(dest))
            moved.append(str(dest))
    return moved


def _check_settings(cfg: RootConfig, kind: str) -> None:
    dirs = kind_dirs(cfg, kind)
    changed = changed_settings(cfg, kind)
    if changed:
        if cfg.generate.on_config_change == "error":
            raise StageError(
                f"{dirs['trajectories']} holds {kind} trajectories made under other settings:\n  "
                + "\n  ".join(changed)
                + "\nUse another run_dir, restore those settings, or set generate.on_config_change=rerun "
                "to move the old outputs aside and start over.")
        moved = _move_aside(list(dirs.values()))
        log.warning("%s: settings changed (%s); moved old outputs to %s", kind, "; ".join(changed), moved)
    dirs["trajectories"].mkdir(parents=True, exist_ok=True)
    (dirs["trajectories"] / SETTINGS_FILE).write_text(
        json.dumps(generation_settings(cfg, kind), indent=2, sort_keys=True, default=str) + "\n")


# -- Ray side ----------------------------------------------------------------------------------------------
def teacher_resources(cfg: RootConfig) -> tuple[float, float]:
    """(num_cpus, num_gpus) of one teacher actor. vLLM with tensor parallelism gets all its GPUs."""
    t = cfg.teacher
    gpus = t.num_gpus
    if t.backend == "vllm" and gpus == 0:
        gpus = float(t.tensor_parallel_size)
    cpus = cfg.generate.worker_num_cpus if cfg.generate.worker_num_cpus is not None else t.num_cpus
    return cpus, gpus


class _Tools:
    """The actor pools an agent run needs (sandboxes, retriever), started for the run and stopped after."""

    def __init__(self, cfg: RootConfig, kind: str) -> None:
        self.sandbox_pool: Any = None
        self.web_search: Any = None
        self._actors: list[Any] = []
        if kind != "agent":
            return
        try:
            if uses_web_search(cfg):
                self.web_search = self._start_retriever(cfg)
            self.sandbox_pool = self._start_sandboxes(cfg)
        except BaseException:
            self.close()
            raise

    def _start_retriever(self, cfg: RootConfig) -> Any:
        from raydistill.actors.retriever import make_web_search_tool, start_retriever
        from raydistill.retrieval import resolve_index_dir

        index_dir = resolve_index_dir(cfg)
        if not index_dir.exists():
            raise StageError(f"agent episodes offer web_search but there is no retrieval index at {index_dir}; "
                             "build it first (`raydistill index --config ...`) or set retrieval.enabled=false")
        handle = start_retriever(cfg, index_dir)
        self._actors.append(handle)
        return make_web_search_tool(handle, k=cfg.retrieval.top_k)

    def _start_sandboxes(self, cfg: RootConfig) -> Any:
        from raydistill.actors.sandbox_pool import SandboxPool

        pool = SandboxPool(cfg.sandbox)
        self._actors.append(pool)
        return pool

    def close(self) -> None:
        import ray

        for a in self._actors:
            try:
                if hasattr(a, "shutdown"):
                    a.shutdown()
                else:
                    ray.kill(a)
            except Exception as e:
                log.debug("stopping %s failed: %s", a, e)


class Progress:
    """Episodes done/total, throughput, pass rate and tool latency, logged every `interval_s`."""

    def __init__(self, kind: str, total: int, already: int, interval_s: float) -> None:
        self.kind, self.total, self.already, self.interval_s = kind, total, already, interval_s
        self.t0 = time.monotonic()
        self.last = self.t0
        self.done = 0
        self.skipped = 0
        self.correct = 0
        self.tokens = 0
        self.steps = 0
        self.code_steps = 0
        self.gen_s = 0.0
        self.exec_s = 0.0
        self.reasons: Counter = Counter()

    def update(self, batch: dict[str, list]) -> None:
        for i, skipped in enumerate(batch["skipped"]):
            if skipped:
                self.skipped += 1
                continue
            self.done += 1
            graded = batch["correct"][i] is not None  # None: left to the filter step (grade_in_worker off)
            self.correct += bool(batch["correct"][i])
            self.tokens += batch["completion_tokens"][i] or 0
            self.steps += batch["steps"][i] or 0
            self.code_steps += batch["code_steps"][i] or 0
            self.gen_s += batch["gen_s"][i] or 0.0
            self.exec_s += batch["exec_s"][i] or 0.0
            self.reasons[batch["reason"][i] or ("passed" if graded else "ungraded")] += 1
        now = time.monotonic()
        if now - self.last >= self.interval_s and self.already + self.done + self.skipped < self.total:
            self.last = now
            log.info("%s", self.line())

    def stats(self) -> dict[str, Any]:
        el = max(time.monotonic() - self.t0, 1e-9)
        return {
            "episodes": self.done, "skipped_already_done": self.skipped, "elapsed_s": round(el, 2),
            "episodes_per_s": round(self.done / el, 3), "generated_tokens": self.tokens,
            "generated_tokens_per_s": round(self.tokens / el, 1),
            "gen_s_per_step": round(self.gen_s / self.steps, 4) if self.steps else None,
            "tool_s_per_code_step": round(self.exec_s / self.code_steps, 4) if self.code_steps else None,
            "correct": self.correct, "reasons": dict(self.reasons),
        }

    def line(self) -> str:
        s = self.stats()
        done = self.already + self.done + self.skipped
        rate = s["episodes_per_s"]
        eta = (self.total - done) / rate if rate else float("nan")
        tool = s["tool_s_per_code_step"]
        return (f"{self.kind}: {done}/{self.total} episodes ({100 * done / max(self.total, 1):.1f}%), "
                f"{rate:.2f} ep/s, {s['generated_tokens_per_s']:.0f} tok/s, "
                f"correct {self.correct}/{self.done or 0}, tool {tool if tool is not None else '-'} s/step, "
                f"eta {eta:.0f}s")


def _iter_results(cfg: RootConfig, kind: str, rows: list[dict[str, Any]], out_dir: Path, tools: Any,
                  worker_cls: type, worker_kwargs: dict[str, Any] | None = None) -> Iterator[Any]:
    import ray.data
    from ray.data import ActorPoolStrategy

    g = cfg.generate
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    n_blocks = max(1, math.ceil(len(rows) / g.batch_size))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    # Enough batches in flight per actor that the episode cap stays full while a batch's tail finishes.
    in_flight = math.ceil(g.episodes_per_worker / g.batch_size) + 1
    cpus, gpus = teacher_resources(cfg)
    # Ray Data gives map actors max_restarts=-1 and max_task_retries=-1 by default: a dead teacher actor is
    # restarted and its batch re-run (the re-run skips rows already on disk).
    out = ds.map_batches(
        worker_cls,
        fn_constructor_kwargs={"cfg": cfg, "kind": kind, "out_dir": str(out_dir),
                               "sandbox_pool": tools.sandbox_pool, "web_search": tools.web_search,
                               **(worker_kwargs or {})},
        batch_size=g.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=g.num_workers, max_tasks_in_flight_per_actor=in_flight,
                                  max_concurrent_calls_per_actor=in_flight),
        num_cpus=cpus,
        num_gpus=gpus or None,
    )
    yield from out.iter_batches(batch_size=None, batch_format="pyarrow")


def generate_trajectories(cfg: RootConfig, kind: str, rows: list[dict[str, Any]], *,
                          worker_cls: type | None = None, tools: Any = None,
                          worker_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make every missing (id, sample) trajectory of `kind` under <run_dir>/trajectories/<kind>/.

    worker_cls: a TeacherWorker subclass (tests, benchmarks). tools: an object with `sandbox_pool`,
    `web_search` and `close()` to use instead of starting the sandbox pool and retriever here.
    worker_kwargs: extra constructor arguments of worker_cls.
    """
    from raydistill.actors.teacher import TeacherWorker
    from raydistill.stages.ray_init import init_ray

    out_dir = kind_dirs(cfg, kind)["trajectories"]
    _check_settings(cfg, kind)
    store = TrajectoryStore(out_dir)
    removed = store.clean_tmp()
    if removed:
        log.info("%s: removed %d temp files of an interrupted run", kind, removed)
    done = store.keys()
    todo = [r for r in rows if (r["id"], r["sample"]) not in done]
    already = len(rows) - len(todo)
    log.info("%s: %d episodes, %d already done, %d to run", kind, len(rows), already, len(todo))
    progress = Progress(kind, len(rows), already, cfg.generate.progress_interval_s)
    if todo:
        from raydistill.actors.teacher import write_run_token

        token = write_run_token(out_dir)
        init_ray(cfg.ray)
        own_tools = tools is None
        tools = _Tools(cfg, kind) if own_tools else tools
        try:
            for batch in _iter_results(cfg, kind, todo, out_dir, tools, worker_cls or TeacherWorker,
                                       {"run_token": token, **(worker_kwargs or {})}):
                progress.update(batch.to_pydict())
        finally:
            if own_tools:
                tools.close()
        log.info("%s", progress.line())
    present = store.keys()
    missing = [(r["id"], r["sample"]) for r in rows if (r["id"], r["sample"]) not in present]
    if missing:
        raise StageError(f"{kind}: {len(missing)} episodes have no trajectory after the run "
                         f"(e.g. {missing[:3]}); rerun to resume")
    return {"dir": str(out_dir), "total": len(rows), "already_done": already, **progress.stats()}


# -- core steps after generation -----------------------------------------------------------------------
def filter_and_build(cfg: RootConfig, kind: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Grade + filter -> filter/<kind>/, then SFT -> sft/<kind>/ (skipped when already made for this input)."""
    from raydistill.sft import build_sft_dataset, load_tokenizer, read_meta

    dirs = kind_dirs(cfg, kind)
    keys = [(r["id"], r["sample"]) for r in rows]
    fp = downstream_fingerprint(cfg, kind, keys)
    meta = read_meta(dirs["sft"])
    report_path = dirs["filter"] / "report.json"
    if meta and meta.get("fingerprint") == fp and report_path.exists():
        log.info("%s: filter and SFT data are up to date", kind)
        return {"report": json.loads(report_path.read_text()), "sft": meta, "skipped": True}
    trajs, dups = TrajectoryStore(dirs["trajectories"]).read(set(keys))
    if dups:
        log.warning("%s: %d duplicate trajectory rows ignored", kind, dups)
    g = cfg.generate
    result = apply_filter(trajs, max_correct_per_question=g.max_correct_per_question,
                          keep_all_for_smoke=g.keep_all_for_smoke, kind=kind)
    result.report["duplicate_rows_ignored"] = dups
    dirs["filter"].mkdir(parents=True, exist_ok=True)
    write_table(dirs["filter"] / "trajectories.parquet", result.trajectories)
    report_path.write_text(json.dumps(result.report, indent=2) + "\n")
    tok_name = cfg.student.tokenizer or cfg.student.model
    tokenizer = load_tokenizer(tok_name)
    max_len = cfg.sft.max_length if kind == "agent" else cfg.sft.cot_max_length
    meta = build_sft_dataset(result.kept, dirs["sft"], tokenizer=tokenizer, tokenizer_name=tok_name, kind=kind,
                             max_length=max_len, overlong=cfg.sft.overlong, system_prompt=cfg.sft.system_prompt,
                             shard_rows=cfg.sft.shard_rows, fingerprint=fp,
                             keep_all_for_smoke=g.keep_all_for_smoke)
    return {"report": result.report, "sft": meta, "skipped": False}


def summary_lines(kind: str, report: dict[str, Any], sft_meta: dict[str, Any]) -> list[str]:
    lines = [f"{kind}: {report['total']} trajectories, {report['passed']} pass the filter "
             f"({(report['pass_rate'] or 0) * 100:.1f}%), {sft_meta['count']} SFT examples"
             + (" [keep_all_for_smoke: failing trajectories kept]" if report["keep_all_for_smoke"] else "")]
    for src, s in report["by_source"].items():
        lines.append(f"  {src}: {s['passed']}/{s['total']} pass ({(s['pass_rate'] or 0) * 100:.1f}%), "
                     f"{s['correct']} correct")
    if report["reasons_primary"]:
        lines.append("  rejected: " + ", ".join(f"{k} {v}" for k, v in report["reasons_primary"].items()))
    dropped = sft_meta.get("stats", {}).get("dropped") or {}
    if dropped or sft_meta.get("stats", {}).get("truncated"):
        lines.append(f"  SFT left out: {dropped}, truncated: {sft_meta['stats']['truncated']}")
    return lines


# -- stage contract ----------------------------------------------------------------------------------------
def run(cfg: RootConfig, *, worker_cls: type | None = None) -> dict[str, Any]:
    """Generate, filter and build SFT data for every kind in generate.kinds. Resumable; skips what is done."""
    t0 = time.monotonic()
    rows = question_rows(cfg)
    out: dict[str, Any] = {"stage": "generate", "kinds": {}}
    for kind in cfg.generate.kinds:
        k0 = time.monotonic()
        gen = generate_trajectories(cfg, kind, rows, worker_cls=worker_cls)
        post = filter_and_build(cfg, kind, rows)
        dirs = kind_dirs(cfg, kind)
        out["kinds"][kind] = {
            "generation": gen, "filter_report": str(dirs["filter"] / "report.json"),
            "filtered_trajectories": str(dirs["filter"] / "trajectories.parquet"), "sft_dir": str(dirs["sft"]),
            "sft_count": post["sft"]["count"], "passed": post["report"]["passed"],
            "pass_rate": post["report"]["pass_rate"], "seconds": round(time.monotonic() - k0, 2),
        }
        for line in summary_lines(kind, post["report"], post["sft"]):
            log.info("%s", line)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def is_done(cfg: RootConfig) -> bool:
    """True when every kind's SFT data exists for exactly this config and question set."""
    from raydistill.sft import read_meta

    try:
        rows = question_rows(cfg)
    except Exception:
        return False
    keys = [(r["id"], r["sample"]) for r in rows]
    for kind in cfg.generate.kinds:
        dirs = kind_dirs(cfg, kind)
        meta = read_meta(dirs["sft"])
        if not meta or meta.get("fingerprint") != downstream_fingerprint(cfg, kind, keys):
            return False
        if not (dirs["filter"] / "report.json").exists():
            return False
    return True


def outputs(cfg: RootConfig) -> list[Path]:
    """Every directory this stage writes (for the distill job's on_config_change=rerun)."""
    return [p for kind in cfg.generate.kinds for p in kind_dirs(cfg, kind).values()]


def add_arguments(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")


def main(cfg: RootConfig, args: Any) -> int:
    try:
        summary = run(cfg)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    else:
        for kind, s in summary["kinds"].items():
            print(f"{kind}: {s['generation']['total']} episodes ({s['generation']['episodes']} run now), "
                  f"{s['passed']} pass the filter ({(s['pass_rate'] or 0) * 100:.1f}%), {s['sft_count']} SFT "
                  f"examples -> {s['sft_dir']}  (report: {s['filter_report']})")
    return 0
