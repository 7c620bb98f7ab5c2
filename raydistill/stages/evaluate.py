"""Evaluate students on the bundled test sets and write the report (`raydistill evaluate`, METHOD.md §3, §6).

Modes: `agent` / `agent_sag` run the agent-distilled student (short student prompt, code + web_search tools)
without / with self-consistent action generation; `cot` / `rag_cot` run the CoT-distilled baseline student,
plain or with the top-k retrieved passages prepended (the paper's RAG-CoT baseline).

Offline (default): a Ray Data pipeline over (question, mode) rows; an actor pool (`evaluate.num_workers`
actors, fractional CPUs, `student.num_gpus` each) where each actor holds one student engine and runs
`evaluate.concurrency` episodes at once on one event loop, so the engine sees full batches. Modes that use the
same adapter share one pass (one engine load). Against a running endpoint (`evaluate.endpoint`): agent modes
POST /v1/solve, CoT modes use its OpenAI-compatible /v1/chat/completions; no Ray needed.

Resumable: every finished batch is written as one Parquet part under <run_dir>/eval/results/<model>/<mode>/
(atomic rename) before the batch counts as done; a rerun skips every (model, mode, id) already there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from raydistill.agent.trajectory import Trajectory
from raydistill.config import RootConfig
from raydistill.data import load_set
from raydistill.report import done_keys, read_results, result_row, to_table, write_report
from raydistill.serving.student import model_label, model_size_b, resolve_adapter, student_engine_cfg

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
RESULTS_DIR = "results"
AGENT_MODES = ("agent", "agent_sag")
COT_MODES = ("cot", "rag_cot")


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class Variant:
    """One student engine (base model + adapter) and the modes evaluated with it."""

    label: str
    adapter: str | None
    modes: list[str] = field(default_factory=list)
    size_b: float | None = None


def mode_kind(mode: str) -> str:
    return "agent" if mode in AGENT_MODES else "cot"


def eval_dir(cfg: RootConfig) -> Path:
    return cfg.run_path / EVAL_DIR


def results_dir(cfg: RootConfig) -> Path:
    return eval_dir(cfg) / RESULTS_DIR


def _label(cfg: RootConfig, adapter: str | None, kind: str) -> str:
    if cfg.evaluate.model_label:
        base = cfg.evaluate.model_label
        return f"{base}+{kind}" if adapter and len(_adapters(cfg)) > 1 else base
    base = model_label(cfg.student, None)
    if not adapter:
        return base
    trained = cfg.run_path / "train" / kind / "adapter"
    suffix = f"{kind}-distilled" if Path(adapter) == trained else Path(adapter).name
    return f"{base}+{suffix}"


def _adapters(cfg: RootConfig) -> set[str | None]:
    ev = cfg.evaluate
    out = set()
    for mode in ev.modes:
        kind = mode_kind(mode)
        setting = ev.agent_adapter if kind == "agent" else ev.cot_adapter
        out.add(resolve_adapter(setting, cfg.run_path, kind, cfg.student))  # type: ignore[arg-type]
    return out


def variants(cfg: RootConfig) -> list[Variant]:
    """Group the configured modes by the adapter they use (one engine load per distinct adapter)."""
    ev = cfg.evaluate
    if ev.endpoint:
        label = ev.model_label or "endpoint"
        return [Variant(label=label, adapter=None, modes=list(dict.fromkeys(ev.modes)), size_b=ev.model_size_b)]
    by_adapter: dict[str | None, Variant] = {}
    for mode in dict.fromkeys(ev.modes):
        kind = mode_kind(mode)
        setting = ev.agent_adapter if kind == "agent" else ev.cot_adapter
        adapter = resolve_adapter(setting, cfg.run_path, kind, cfg.student)  # type: ignore[arg-type]
        v = by_adapter.setdefault(adapter, Variant(label=_label(cfg, adapter, kind), adapter=adapter))
        v.modes.append(mode)
    return list(by_adapter.values())


def question_rows(cfg: RootConfig) -> list[dict[str, Any]]:
    """The evaluation questions: first `limit` of each set (evaluate.limit, else data.limit)."""
    ev = cfg.evaluate
    sets = ev.sets or cfg.data.test_sets
    if not sets:
        raise ValueError("evaluate: no test sets (set evaluate.sets or data.test_sets)")
    limit = ev.limit or cfg.data.limit
    rows = []
    for name in sets:
        res = load_set(name, strict=cfg.data.strict, limit=limit)
        if res.skipped:
            log.warning("%s: skipped %d bad rows (first: row %d: %s)", name, len(res.skipped), *res.skipped[0])
        for r in res.records:
            gold = r.answer if isinstance(r.answer, list) else [r.answer]
            rows.append({"id": r.id, "question": r.question, "gold": [str(g) for g in gold], "domain": r.domain,
                         "source": r.source, "benchmark": res.name})
    return rows


def _check_modes(cfg: RootConfig) -> None:
    ev = cfg.evaluate
    if not ev.modes:
        raise ValueError("evaluate.modes is empty")
    if "rag_cot" in ev.modes and not cfg.retrieval.enabled:
        raise ValueError("evaluate.modes has rag_cot, which needs retrieval (retrieval.enabled=true and an index)")


def plan(cfg: RootConfig) -> list[tuple[Variant, list[dict[str, Any]]]]:
    """(variant, rows still to do) where each row is a question plus its mode."""
    _check_modes(cfg)
    questions = question_rows(cfg)
    done = done_keys(results_dir(cfg))
    out = []
    for v in variants(cfg):
        todo = [{**q, "mode": m} for m in v.modes for q in questions if (v.label, m, q["id"]) not in done]
        out.append((v, todo))
    return out


def is_done(cfg: RootConfig) -> bool:
    try:
        pending = plan(cfg)
    except Exception:
        return False
    return all(not todo for _, todo in pending) and (eval_dir(cfg) / "report.md").exists()


# ------------------------------------------------------------------------------------------------ one question


async def grade_result(traj: Trajectory, judge: Any = None) -> Trajectory:
    """Grade in place (METHOD.md §3): math_equal for math; EM/F1 for QA, the LLM judge's verdict when one is
    configured (EM otherwise). A grading failure is recorded (correct=None), never raised."""
    from raydistill.grading import grade

    if not traj.gold:
        traj.correct, traj.scores = None, json.dumps({"error": "no gold answer"})
        return traj
    pred = traj.final_answer
    try:
        scores = await asyncio.to_thread(grade, pred if pred is not None else "", traj.gold, traj.domain)
    except Exception as e:
        traj.correct, traj.scores = None, json.dumps({"error": f"grading: {type(e).__name__}: {e}"})
        return traj
    correct = bool(scores.get("correct")) and pred is not None
    if judge is not None and traj.domain == "qa" and pred is not None:
        verdict = await judge.ajudge(traj.question, pred, traj.gold)
        scores["judge"] = verdict.to_dict()
        if verdict.correct is not None:
            correct = bool(verdict.correct)
    traj.correct = correct
    traj.scores = json.dumps(scores, default=str)
    return traj


def _record(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "question": row["question"], "answer": list(row.get("gold") or []),
            "domain": row.get("domain"), "source": row.get("source")}


def _failed(row: dict[str, Any], kind: str, error: str) -> Trajectory:
    return Trajectory(id=row["id"], source=row.get("source") or "", domain=row.get("domain") or "math",
                      question=row["question"], gold=list(row.get("gold") or []), kind=kind, error=error)


def make_judge(cfg: RootConfig) -> Any:
    ev = cfg.evaluate
    if not ev.judge_base_url:
        return None
    if not ev.judge_model:
        raise ValueError("evaluate.judge_base_url is set but evaluate.judge_model is not")
    from raydistill.grading.judge import LLMJudge

    return LLMJudge(ev.judge_base_url, ev.judge_model, api_key_env=ev.judge_api_key_env)


class PartWriter:
    """Atomic Parquet parts: <dir>/<label>/<mode>/part-<time>-<tag>-<n>.parquet (a batch is durable or absent)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tag = uuid.uuid4().hex[:8]
        self.n = 0

    def write(self, rows: list[dict[str, Any]]) -> list[Path]:
        paths = []
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            groups.setdefault((r["model_label"], r["mode"]), []).append(r)
        for (label, mode), group in groups.items():
            d = self.root / _safe(label) / mode
            d.mkdir(parents=True, exist_ok=True)
            self.n += 1
            path = d / f"part-{time.strftime('%Y%m%d%H%M%S')}-{self.tag}-{self.n:05d}.parquet"
            tmp = path.with_suffix(".tmp")
            pq.write_table(to_table(group), tmp)
            os.replace(tmp, path)
            paths.append(path)
        return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


class QuestionRunner:
    """Runs one (question, mode) with a given engine and tools, grades it and returns the result row."""

    def __init__(self, cfg: RootConfig, engine: Any, variant: Variant, *, web_search: Callable | None = None,
                 passages: Callable | None = None, sandbox_factory: Callable | None = None, judge: Any = None,
                 solve: Callable | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.variant = variant
        self.tools = {"web_search": web_search} if web_search is not None and cfg.agent.web_search else {}
        self.passages = passages
        self.sandbox_factory = sandbox_factory
        self.judge = judge
        self.solve = solve
        """Endpoint mode: `solve(row, sag: bool) -> Trajectory` replaces the local episode."""

    async def run_row(self, row: dict[str, Any]) -> dict[str, Any]:
        from raydistill.agent import run_cot, run_episode

        mode = row["mode"]
        kind = mode_kind(mode)
        agent_cfg = self.cfg.agent
        try:
            if kind == "agent":
                sag = mode == "agent_sag"
                if self.solve is not None:
                    traj = await self.solve(row, sag)
                else:
                    acfg = agent_cfg.model_copy(update={"sag": agent_cfg.sag.model_copy(update={"enabled": sag}),
                                                        "ftp": False})
                    sandbox = self.sandbox_factory
                    tools: Any = self.tools if sandbox is None else list(self.tools)
                    traj = await run_episode(self.engine, sandbox, _record(row), acfg, role="student",
                                             tools=tools, seed=self.cfg.seed)
            else:
                passages = None
                if mode == "rag_cot":
                    if self.passages is None:
                        raise RuntimeError("rag_cot needs a retriever")
                    passages = await self.passages(row["question"], self.cfg.retrieval.top_k)
                budget = self.cfg.evaluate.cot_max_new_tokens or self.cfg.generate.cot_max_new_tokens
                traj = await run_cot(self.engine, _record(row), agent_cfg, passages=passages, role="student",
                                     seed=self.cfg.seed, max_tokens=budget)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("%s/%s crashed: %s: %s", row["id"], mode, type(e).__name__, e)
            traj = _failed(row, kind, f"evaluation: {type(e).__name__}: {e}")
        traj.id, traj.gold, traj.source, traj.domain = row["id"], list(row.get("gold") or []), \
            row.get("source") or traj.source, row.get("domain") or traj.domain
        await grade_result(traj, self.judge)
        return result_row(traj, model_label=self.variant.label, mode=mode, benchmark=row["benchmark"],
                          adapter=self.variant.adapter, model_size_b=self.variant.size_b)

    async def run_rows(self, rows: Sequence[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
        sem = asyncio.Semaphore(concurrency)

        async def one(r: dict[str, Any]) -> dict[str, Any]:
            async with sem:
                return await self.run_row(r)

        return list(await asyncio.gather(*(one(r) for r in rows)))


# ------------------------------------------------------------------------------------------------ offline (Ray)


class EvalWorker:
    """Ray Data actor: one student engine; each batch's rows run concurrently, are graded, and are written as
    Parquet parts before the batch returns (so a returned batch is durable)."""

    def __init__(self, cfg: dict[str, Any], variant: dict[str, Any], out_dir: str, sandbox_pool: Any = None,
                 retriever: Any = None) -> None:
        from raydistill.engines import create_engine

        self.cfg = RootConfig.model_validate(cfg)
        self.variant = Variant(**variant)
        self.writer = PartWriter(out_dir)
        self.engine = create_engine(student_engine_cfg(self.cfg.student, self.variant.adapter))
        web_search = passages = None
        if retriever is not None:
            from raydistill.actors.retriever import make_web_search_tool

            web_search = make_web_search_tool(retriever)
            passages = _actor_passages(retriever)
        tools = {"web_search": web_search} if web_search is not None and self.cfg.agent.web_search else {}
        factory = None
        if sandbox_pool is not None:
            timeout_s = self.cfg.sandbox.start_timeout_s * 2

            async def factory() -> Any:
                try:
                    return await asyncio.wait_for(sandbox_pool.create(tools=tools), timeout=timeout_s)
                except TimeoutError:
                    raise RuntimeError(f"no sandbox within {timeout_s:.0f}s (sandbox hosts overloaded or down)") \
                        from None

        self.runner = QuestionRunner(self.cfg, self.engine, self.variant, web_search=web_search,
                                     passages=passages, sandbox_factory=factory, judge=make_judge(self.cfg))
        self._sem: asyncio.Semaphore | None = None

    async def __call__(self, batch: Any) -> dict[str, list]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.cfg.evaluate.concurrency)
        rows = batch.to_pylist()

        async def one(r: dict[str, Any]) -> dict[str, Any]:
            async with self._sem:
                return await self.runner.run_row(r)

        results = list(await asyncio.gather(*(one(r) for r in rows)))
        await asyncio.to_thread(self.writer.write, results)
        return {"id": [r["id"] for r in results], "mode": [r["mode"] for r in results],
                "correct": [r["correct"] for r in results], "failure": [r["failure"] for r in results]}


def _actor_passages(handle: Any) -> Callable:
    async def passages(query: str, k: int) -> list[str]:
        hits = await handle.search.remote([query], k)
        return [h.contents if hasattr(h, "contents") else str(h) for h in hits[0]]

    return passages


def _wait_pool_ready(pool: Any, timeout_s: float) -> None:
    """Fail fast when sandbox host actors cannot be scheduled (episodes on them would wait forever)."""
    import ray

    refs = [a.stats.remote() for a in pool.actors]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise RuntimeError(f"{len(pending)} of {len(refs)} sandbox host actors did not start within {timeout_s:.0f}s "
                           f"(each asks for {pool.config.pool.num_cpus_per_actor} CPU): lower "
                           "sandbox.pool.num_actors / num_cpus_per_actor or add nodes")


def _start_retriever(cfg: RootConfig) -> Any:
    from raydistill.actors.retriever import start_retriever
    from raydistill.retrieval import load_meta, resolve_index_dir

    load_meta(resolve_index_dir(cfg))  # a clear "build the index first" error before any actor starts
    return start_retriever(cfg)


def _run_offline(cfg: RootConfig, variant: Variant, rows: list[dict[str, Any]], sandbox_pool: Any,
                 retriever: Any) -> dict:
    import ray

    ev = cfg.evaluate
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(
        EvalWorker,
        fn_constructor_kwargs={"cfg": cfg.model_dump(), "variant": vars(variant), "out_dir": str(results_dir(cfg)),
                               "sandbox_pool": sandbox_pool, "retriever": retriever},
        batch_size=ev.batch_size, batch_format="pyarrow", concurrency=ev.num_workers, num_cpus=ev.num_cpus,
        num_gpus=cfg.student.num_gpus if ev.num_gpus is None else ev.num_gpus,
    )
    n = correct = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        n += batch.num_rows
        correct += sum(1 for c in batch["correct"].to_pylist() if c)
        log.info("evaluate %s: %d/%d done", variant.label, n, len(rows))
    return {"ran": n, "correct": correct}


# ------------------------------------------------------------------------------------------------ endpoint


class EndpointClient:
    """Agent episodes via POST /v1/solve on a running student endpoint."""

    def __init__(self, cfg: RootConfig) -> None:
        import httpx

        ev = cfg.evaluate
        self.cfg = cfg
        headers = {}
        if ev.endpoint_api_key_env:
            key = os.environ.get(ev.endpoint_api_key_env)
            if not key:
                raise ValueError(f"evaluate.endpoint_api_key_env={ev.endpoint_api_key_env!r} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(base_url=ev.endpoint.rstrip("/"), headers=headers,
                                        timeout=ev.request_timeout_s,
                                        limits=httpx.Limits(max_connections=ev.concurrency))

    async def model_name(self) -> str:
        r = await self.client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    async def solve(self, row: dict[str, Any], sag: bool) -> Trajectory:
        a = self.cfg.agent
        body: dict[str, Any] = {"question": row["question"], "domain": row.get("domain") or "qa", "id": row["id"],
                                "max_steps": a.max_steps, "max_new_tokens": a.max_new_tokens}
        if sag:
            body["sag"] = {"n": a.sag.n, "temperature": a.sag.temperature, "top_p": a.sag.top_p}
        r = await self.client.post("/v1/solve", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"endpoint answered {r.status_code}: {r.text[:300]}")
        return Trajectory.model_validate(r.json()["trajectory"])

    async def aclose(self) -> None:
        await self.client.aclose()


async def _run_endpoint(cfg: RootConfig, variant: Variant, rows: list[dict[str, Any]]) -> dict:
    from raydistill.config.engine import EngineConfig
    from raydistill.engines import create_engine

    ev = cfg.evaluate
    client = EndpointClient(cfg)
    engine = passages = None
    try:
        served = await client.model_name()
        if any(mode_kind(r["mode"]) == "cot" for r in rows):
            engine = create_engine(EngineConfig(backend="openai", model=served, base_url=ev.endpoint.rstrip("/") + "/v1",
                                                api_key_env=ev.endpoint_api_key_env,
                                                max_concurrency=ev.concurrency,
                                                request_timeout_s=ev.request_timeout_s))
        if any(r["mode"] == "rag_cot" for r in rows):
            passages = _local_passages(cfg)
        runner = QuestionRunner(cfg, engine, variant, passages=passages, judge=make_judge(cfg), solve=client.solve)
        writer = PartWriter(results_dir(cfg))
        n = correct = 0
        for i in range(0, len(rows), ev.batch_size):
            chunk = rows[i:i + ev.batch_size]
            results = await runner.run_rows(chunk, ev.concurrency)
            writer.write(results)
            n += len(results)
            correct += sum(1 for r in results if r["correct"])
            log.info("evaluate %s via %s: %d/%d done", variant.label, ev.endpoint, n, len(rows))
        return {"ran": n, "correct": correct, "served_model": served}
    finally:
        await client.aclose()
        if engine is not None:
            await engine.aclose()


def _local_passages(cfg: RootConfig) -> Callable:
    from raydistill.retrieval import Retriever, resolve_index_dir

    retriever = Retriever.from_index_dir(resolve_index_dir(cfg), fp16=cfg.retrieval.fp16, nprobe=cfg.retrieval.nprobe)

    async def passages(query: str, k: int) -> list[str]:
        hits = await asyncio.to_thread(retriever.search, [query], k)
        return [h.contents for h in hits[0]]

    return passages


# ------------------------------------------------------------------------------------------------ stage


def _report_rows(cfg: RootConfig, planned: list[Variant], questions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = {q["id"] for q in questions}
    benches = {q["benchmark"] for q in questions}
    keys = {(v.label, m) for v in planned for m in v.modes}
    rows = [r for r in read_results(results_dir(cfg)) if (r["model_label"], r["mode"]) in keys and r["id"] in ids]
    for other in cfg.evaluate.compare_runs:
        path = Path(other).expanduser() / EVAL_DIR / RESULTS_DIR
        if not path.exists():
            raise FileNotFoundError(f"evaluate.compare_runs: no results at {path}")
        rows += [r for r in read_results(path) if r["benchmark"] in benches]
    return rows


def run(cfg: RootConfig) -> dict:
    t0 = time.perf_counter()
    ev = cfg.evaluate
    questions = question_rows(cfg)
    pending = plan(cfg)
    out_dir = eval_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    retriever = pool = None
    try:
        for variant, todo in pending:
            if variant.size_b is None:
                variant.size_b = ev.model_size_b or model_size_b(cfg.student.model)
            if not todo:
                runs[variant.label] = {"ran": 0, "skipped_done": len(questions) * len(variant.modes)}
                continue
            log.info("evaluate %s (%s): %d rows to run", variant.label, ", ".join(variant.modes), len(todo))
            if ev.endpoint:
                runs[variant.label] = asyncio.run(_run_endpoint(cfg, variant, todo))
                continue
            from raydistill.stages.ray_init import init_ray

            init_ray(cfg.ray)
            agent = any(m in AGENT_MODES for m in variant.modes)
            needs_retrieval = cfg.retrieval.enabled and ("rag_cot" in variant.modes or (cfg.agent.web_search and agent))
            if needs_retrieval and retriever is None:
                retriever = _start_retriever(cfg)
            if agent and pool is None:
                from raydistill.actors.sandbox_pool import SandboxPool

                pool = SandboxPool(cfg.sandbox)
                _wait_pool_ready(pool, cfg.sandbox.start_timeout_s * 2)
            runs[variant.label] = _run_offline(cfg, variant, todo, pool if agent else None,
                                               retriever if needs_retrieval else None)
    finally:
        if pool is not None:
            pool.shutdown()
        if retriever is not None:
            import ray

            ray.kill(retriever)
    rows = _report_rows(cfg, [v for v, _ in pending], questions)
    notes = [f"run_dir `{cfg.run_path}`; student `{cfg.student.model}` ({cfg.student.backend})"
             + (f", endpoint {ev.endpoint}" if ev.endpoint else ""),
             f"agent: max {cfg.agent.max_steps} steps, {cfg.agent.max_new_tokens} new tokens per step; sag n="
             f"{cfg.agent.sag.n}, T={cfg.agent.sag.temperature}, top-p={cfg.agent.sag.top_p}",
             f"QA verdict: {'LLM judge ' + str(ev.judge_model) if ev.judge_base_url else 'exact match'}"]
    if ev.compare_runs:
        notes.append("compared runs: " + ", ".join(f"`{r}`" for r in ev.compare_runs))
    report = write_report(rows, out_dir, title="raydistill evaluation", examples_per_group=ev.examples_per_group,
                          notes=notes)
    summary = {"results": str(results_dir(cfg)), "report": report["report_md"], "report_md": report["report_md"],
               "report_html": report["report_html"], "plots": report["plots"], "examples": report["examples"],
               "runs": runs, "series": report["series"], "rows": len(rows),
               "seconds": round(time.perf_counter() - t0, 3)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report-only", action="store_true",
                        help="re-render the report from the results already on disk, run nothing")


def main(cfg: RootConfig, args: argparse.Namespace) -> int:
    if getattr(args, "report_only", False):
        pending = plan(cfg)
        rows = _report_rows(cfg, [v for v, _ in pending], question_rows(cfg))
        if not rows:
            print("no results yet under", results_dir(cfg))
            return 1
        report = write_report(rows, eval_dir(cfg), examples_per_group=cfg.evaluate.examples_per_group)
        print(report["report_md"])
        return 0
    summary = run(cfg)
    for s in summary["series"]:
        acc = "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.1f}%"
        print(f"{s['model']:40s} {s['mode']:10s} n={s['n']:5d} accuracy={acc}")
    print(f"report: {summary['report_md']} ({summary['report_html']})")
    return 0
