"""The whole workflow as one job: index -> generate (trajectories, filter, SFT data) -> train -> evaluate.

Why a manifest with per-stage fingerprints: every stage is resumable on its own and `is_done(cfg)` says whether
its output is complete, but a run directory reused with a *changed* config would otherwise look done (or be
resumed into a mix of two configs). Each stage's fingerprint hashes the config keys that shape its output
(resource knobs such as worker counts excluded, so a job can resume on a bigger cluster) plus its upstream
fingerprints; a mismatch stops the job naming the changed keys, or (`on_config_change: rerun`) moves the stale
outputs aside and redoes that stage and everything after it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib
import json
import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raydistill import __version__
from raydistill.config import RootConfig
from raydistill.config.distill import PIPELINE, DistillConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".distill.lock"

# Config keys that change how fast or where a stage runs, not what it writes: excluded from fingerprints (by
# name, at any depth). A stage whose own `is_done` still keys on one of them is skipped anyway when its
# manifest record has this fingerprint and `is_done` holds under the resource values it was made with.
RESOURCE_KEYS = frozenset({
    "num_workers", "num_cpus", "num_gpus", "num_actors", "cpus_per_worker", "gpus_per_worker", "use_gpu",
    "episodes_per_worker", "batch_size", "shard_rows", "concurrency", "max_concurrency", "max_batch_size",
    "max_num_seqs", "gpu_memory_utilization", "enable_prefix_caching", "tensor_parallel_size",
    "request_timeout_s", "max_retries", "storage_path", "num_to_keep", "checkpoint_every_steps",
    "pool_size", "num_sandboxes", "address", "num_cpus_per_actor", "max_sandboxes_per_actor", "batch_wait_ms",
    "flush_interval_s", "progress_interval_s", "worker_num_cpus", "on_config_change", "enforce_eager",
    "api_key_env", "endpoint_api_key_env", "judge_api_key_env", "micro_batch_size", "gradient_checkpointing",
    "attn_implementation", "packing", "max_tokens_per_batch", "max_failures", "shuffle_buffer",
    "server_num_cpus", "server_num_gpus", "index_device", "start_timeout_s", "warm_sandboxes", "idle_timeout_s",
    "cpu_threads", "max_lora_rank", "cache_size", "ingest", "pad_to_multiple_of", "include_dashboard",
    "object_store_memory",
    # Additive lists: each kind/mode has its own output dir, and the stage's own is_done sees a missing one.
    "kinds", "modes",
})

# Resource keys whose recorded value is NOT put back when checking a stage under its recorded resources.
_NOT_RESTORED = frozenset({"kinds", "modes", "on_config_change"})

# Which parts of the config shape each stage's output. True = the whole section (minus RESOURCE_KEYS).
STAGE_INPUTS: dict[str, dict[str, Any]] = {
    # What the index stage itself keys its output on (seed only matters to IVF training: left out).
    "index": {"retrieval": ("corpus", "embedder", "max_length", "index_type", "index_dir", "shard_size", "fp16",
                            "cpu_bf16", "ivf_nlist", "pq_m", "pq_nbits", "train_size", "hnsw_m", "hnsw_ef_construction")},
    "generate": {"seed": True, "data": ("train_sets", "limit", "strict"), "teacher": True, "agent": True,
                 "sandbox": True, "retrieval": ("enabled", "top_k", "nprobe", "hnsw_ef_search", "refine_factor"), "generate": True,
                 "sft": True,
                 "student": ("model", "tokenizer")},
    "train": {"seed": True, "student": ("model", "tokenizer", "dtype"), "train": True},
    "evaluate": {"seed": True, "data": ("test_sets", "limit", "strict"), "student": True, "agent": True,
                 "sandbox": True, "retrieval": ("enabled", "top_k", "nprobe", "hnsw_ef_search", "refine_factor"), "evaluate": True},
}
UPSTREAM: dict[str, tuple[str, ...]] = {
    "index": (), "generate": ("index",), "train": ("generate",), "evaluate": ("index", "train"),
}
# Outputs inside run_dir that belong to each stage (moved aside on `rerun`; never anything outside run_dir).
STAGE_DIRS: dict[str, tuple[str, ...]] = {
    "index": ("index",), "generate": ("trajectories", "filter", "sft"), "train": ("train",), "evaluate": ("eval",),
}
VERSION_PACKAGES = ("ray", "torch", "transformers", "peft", "vllm", "deepspeed", "faiss-cpu", "faiss-gpu-cu12",
                    "sentence-transformers", "pyarrow", "pydantic", "numpy", "math-verify", "fastapi")


class DistillError(RuntimeError):
    """The job cannot go on; the message says why and what to do."""


class ConfigChanged(DistillError):
    """A stage's output in run_dir was made under a different config."""


# ----------------------------------------------------------------------------------------------- config


def distill_section(cfg: RootConfig) -> DistillConfig:
    """The `distill` section when the root config has one, else the defaults."""
    section = getattr(cfg, "distill", None)
    if section is None:
        return DistillConfig()
    return section if isinstance(section, DistillConfig) else DistillConfig.model_validate(section)


def effective_config(cfg: RootConfig, dcfg: DistillConfig) -> RootConfig:
    """Apply `cot_branch` to generate.kinds / train.kinds / evaluate.modes (a validated copy)."""
    if dcfg.cot_branch is None:
        return cfg
    tree = cfg.model_dump()

    def edit(items: list[str], add: tuple[str, ...], drop: tuple[str, ...]) -> list[str]:
        out = [x for x in items if x not in drop]
        return out + [x for x in add if x not in out]

    if dcfg.cot_branch:
        tree["generate"]["kinds"] = edit(tree["generate"]["kinds"], ("cot",), ())
        tree["train"]["kinds"] = edit(tree["train"]["kinds"], ("cot",), ())
        tree["evaluate"]["modes"] = edit(tree["evaluate"]["modes"], ("cot",), ())
    else:
        tree["generate"]["kinds"] = edit(tree["generate"]["kinds"], (), ("cot",))
        tree["train"]["kinds"] = edit(tree["train"]["kinds"], (), ("cot",))
        tree["evaluate"]["modes"] = edit(tree["evaluate"]["modes"], (), ("cot", "rag_cot"))
    for section, key in (("generate", "kinds"), ("train", "kinds"), ("evaluate", "modes")):
        if not tree[section][key]:
            raise DistillError(f"distill.cot_branch=false leaves {section}.{key} empty; add 'agent' to it")
    return type(cfg).model_validate(tree)


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in sorted(value.items()) if k not in RESOURCE_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def stage_inputs(cfg: RootConfig, stage: str) -> dict[str, Any]:
    """The part of the config that shapes `stage`'s output (JSON-able, resource knobs removed)."""
    tree = cfg.model_dump(mode="json")
    out: dict[str, Any] = {}
    for section, keys in STAGE_INPUTS[stage].items():
        if section not in tree:
            continue
        value = tree[section]
        if keys is not True and isinstance(value, dict):
            value = {k: value[k] for k in keys if k in value}
        out[section] = _strip(value)
    return out


def index_needed(cfg: RootConfig) -> bool:
    return bool(cfg.retrieval.enabled)


def fingerprints(cfg: RootConfig) -> dict[str, str]:
    """Per-stage fingerprint: sha256 of its config inputs and its upstream fingerprints."""
    fps: dict[str, str] = {}
    for stage in PIPELINE:
        if stage == "index" and not index_needed(cfg):
            fps[stage] = "disabled"
            continue
        payload = {"inputs": stage_inputs(cfg, stage), "upstream": {u: fps[u] for u in UPSTREAM[stage]}}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        fps[stage] = hashlib.sha256(blob).hexdigest()[:16]
    return fps


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def config_diff(old: dict, new: dict) -> list[str]:
    """Human-readable `key: old -> new` lines."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            fa = "<unset>" if va is missing else json.dumps(va)
            fb = "<unset>" if vb is missing else json.dumps(vb)
            lines.append(f"{key}: {fa} -> {fb}")
    return lines


# --------------------------------------------------------------------------------------------- manifest


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "raydistill": __version__, "platform": platform.platform()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


class Manifest:
    """run_dir/manifest.json: config, versions, per-stage status/fingerprint/timing/summary, job history.

    Written atomically (temp file + rename) after every change, so a killed job leaves a readable manifest.
    """

    def __init__(self, run_path: Path):
        self.path = run_path / MANIFEST
        self.data: dict[str, Any] = {}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise DistillError(f"{self.path} is not readable JSON ({e}); move it aside to start over") from e
        self.data.setdefault("stages", {})
        self.data.setdefault("jobs", [])

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def save(self) -> None:
        self.data["updated"] = _now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, self.path)


@contextlib.contextmanager
def run_dir_lock(run_path: Path) -> Iterator[None]:
    """One distill job per run_dir at a time (advisory lock; released when the process dies)."""
    run_path.mkdir(parents=True, exist_ok=True)
    with open(run_path / LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise DistillError(f"another distill job is using {run_path} (lock held by {holder})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ stages


def load_stage(name: str):
    """Import raydistill.stages.<name>; a clear error if it is missing or breaks the stage contract."""
    module_name = f"raydistill.stages.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise DistillError(f"stage {name!r} is not available: {module_name} does not exist") from e
        raise
    missing = [f for f in ("run", "is_done") if not callable(getattr(module, f, None))]
    if missing:
        raise DistillError(f"{module_name} lacks {', '.join(missing)} (the stage contract: docs/architecture.md)")
    return module


def stage_outputs(stage: str, cfg: RootConfig) -> list[Path]:
    """Where `stage` writes inside run_dir: the stage's own `outputs(cfg)` when it has one, else the layout."""
    run_path = cfg.run_path
    try:
        module = load_stage(stage)
    except DistillError:
        module = None
    outputs = getattr(module, "outputs", None)
    paths = [Path(p) for p in outputs(cfg)] if callable(outputs) else [run_path / rel for rel in STAGE_DIRS[stage]]
    if stage == "index" and cfg.retrieval.index_dir is not None:
        return []  # an external index is the user's; its stage is simply redone in place
    # Never move anything outside run_dir (a shared index, a checkpoint bucket).
    return [p for p in paths if p.resolve().is_relative_to(run_path)]


def _archive(stages: list[str], cfg: RootConfig) -> list[str]:
    """Move the outputs of `stages` aside to `<name>.stale-<time>` (rename, never delete)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    moved = []
    for stage in stages:
        for src in stage_outputs(stage, cfg):
            if src.exists():
                dst = src.with_name(f"{src.name}.stale-{stamp}")
                os.replace(src, dst)
                moved.append(str(dst))
    return moved


def _find_report(run_path: Path, summary: dict | None) -> str | None:
    for key in ("report", "report_md", "report_path"):
        value = (summary or {}).get(key)
        if isinstance(value, str) and value:
            return value
    for candidate in (run_path / "eval" / "report.md", run_path / "eval" / "report.html"):
        if candidate.exists():
            return str(candidate)
    return None


def artifacts(cfg: RootConfig) -> dict[str, str]:
    """Paths of the run's outputs that exist now (the manifest's artifact list)."""
    run = cfg.run_path
    found: dict[str, str] = {}
    index_dir = Path(cfg.retrieval.index_dir).expanduser() if cfg.retrieval.index_dir else run / "index"
    if index_dir.exists():
        found["index"] = str(index_dir)
    for kind in cfg.generate.kinds:
        for name, rel in (("trajectories", "trajectories"), ("filter", "filter"), ("sft", "sft")):
            p = run / rel / kind
            if p.exists():
                found[f"{name}.{kind}"] = str(p)
    for kind in cfg.train.kinds:
        p = run / "train" / kind / "adapter"
        if p.exists():
            found[f"adapter.{kind}"] = str(p)
    for name in ("report.md", "report.html"):
        p = run / "eval" / name
        if p.exists():
            found[name] = str(p)
    return found


def _in_ray_job() -> bool:
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _ray_job_id() -> str | None:
    """The submission id when this driver was started by `ray job submit` (from the job config Ray injects)."""
    try:
        metadata = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("metadata") or {}
    except (KeyError, ValueError, AttributeError):
        return None
    return metadata.get("job_submission_id")


def _say(msg: str) -> None:
    """Progress lines: on stdout (what `ray job logs` streams) and in the log."""
    print(f"[distill] {msg}", flush=True)
    log.debug(msg)


def plan(cfg: RootConfig, dcfg: DistillConfig | None = None) -> list[dict[str, Any]]:
    """What a job would do now, per stage: action in {run, skip, not-selected, disabled, stale} (no Ray)."""
    dcfg = dcfg or distill_section(cfg)
    cfg = effective_config(cfg, dcfg)
    manifest = Manifest(cfg.run_path) if (cfg.run_path / MANIFEST).exists() else None
    fps = fingerprints(cfg)
    rows = []
    for stage in PIPELINE:
        row: dict[str, Any] = {"stage": stage, "fingerprint": fps[stage]}
        if stage == "index" and not index_needed(cfg):
            row["action"] = "disabled"
        else:
            rec = manifest.stages.get(stage) if manifest else None
            if rec and rec.get("fingerprint") not in (None, fps[stage]):
                row["action"] = "stale"
            elif _stage_done(stage, cfg, rec, fps[stage]):
                row["action"] = "skip"
            elif stage in dcfg.stages:
                row["action"] = "run"
            else:
                row["action"] = "not-selected"
        rows.append(row)
    return rows


def with_recorded_resources(cfg: RootConfig, recorded: dict[str, Any] | None) -> RootConfig | None:
    """`cfg` with the RESOURCE_KEYS values of `recorded` (a config dump) put back; None if nothing differs."""
    if not recorded:
        return None
    tree = cfg.model_dump(mode="json")
    changed = False

    def restore(cur: dict[str, Any], old: dict[str, Any]) -> None:
        nonlocal changed
        for key, value in old.items():
            if key not in cur:
                continue
            if key in RESOURCE_KEYS and key not in _NOT_RESTORED:
                if cur[key] != value:
                    cur[key], changed = value, True
            elif isinstance(value, dict) and isinstance(cur[key], dict):
                restore(cur[key], value)

    restore(tree, recorded)
    if not changed:
        return None
    try:
        return type(cfg).model_validate(tree)
    except ValueError:
        return None


def _stage_done(stage: str, cfg: RootConfig, rec: dict[str, Any] | None = None, fp: str | None = None,
                module: Any = None) -> bool:
    """The stage's own `is_done(cfg)`; failing that, with a manifest record of the same fingerprint, its
    `is_done` under the resource settings the output was made with (a stage that keys its output on, say,
    the sandbox pool size is not redone because the job came back with more sandboxes)."""
    if module is None:
        try:
            module = load_stage(stage)
        except DistillError:
            return False
    if module.is_done(cfg):
        return True
    if not rec or fp is None or rec.get("fingerprint") != fp or rec.get("status") != "done":
        return False
    old = with_recorded_resources(cfg, rec.get("config"))
    return old is not None and bool(module.is_done(old))


def run(cfg: RootConfig, dcfg: DistillConfig | None = None) -> dict[str, Any]:
    """Run (or resume) the whole workflow for `cfg`; returns a summary with the manifest and report paths."""
    dcfg = dcfg or distill_section(cfg)
    cfg = effective_config(cfg, dcfg)
    run_path = cfg.run_path
    if _in_ray_job() and not Path(cfg.run_dir).expanduser().is_absolute():
        log.warning("run_dir %r is relative: inside a submitted Ray job it resolves to the job's temporary "
                    "working dir (%s), which Ray deletes; pass run_dir=/an/absolute/or/shared/path",
                    cfg.run_dir, run_path)
    t_job = time.perf_counter()
    with run_dir_lock(run_path):
        manifest = Manifest(run_path)
        fps = fingerprints(cfg)
        _say(f"run_dir {run_path} (fingerprints: {', '.join(f'{k} {v}' for k, v in fps.items())})")
        job = _start_job(manifest, cfg, dcfg)

        def ensure_ray() -> None:
            """Connect to (or start) Ray before the first stage that has work: a finished run skips it all."""
            if "cluster" not in job:
                from raydistill.stages.ray_init import init_ray

                init_ray(cfg.ray)
                job["cluster"] = _cluster_info()

        stages_summary: dict[str, Any] = {}
        try:
            _check_fingerprints(manifest, cfg, dcfg, fps)
            selected = [s for s in PIPELINE if s in dcfg.stages]
            _check_selection(cfg, selected, manifest, fps)
            for i, stage in enumerate(PIPELINE, 1):
                tag = f"{i}/{len(PIPELINE)} {stage}"
                entry = _run_stage(stage, tag, cfg, manifest, fps, selected, ensure_ray)
                stages_summary[stage] = entry
                job["stages"][stage] = entry
                manifest.save()
            if dcfg.deploy:
                ensure_ray()
                stages_summary["deploy"] = job["stages"]["deploy"] = _deploy(cfg, manifest)
            job["status"] = "succeeded"
        except BaseException as e:
            job["status"] = "failed"
            job["error"] = f"{type(e).__name__}: {e}"
            raise
        finally:
            job["finished"] = _now()
            job["seconds"] = round(time.perf_counter() - t_job, 3)
            manifest.data["artifacts"] = artifacts(cfg)
            manifest.data["report"] = _find_report(run_path, manifest.stages.get("evaluate", {}).get("summary"))
            manifest.save()
    report = manifest.data.get("report")
    _say(f"finished in {job['seconds']:.1f} s; manifest {manifest.path}")
    if report:
        _say(f"report: {report}")
    return {"run_dir": str(run_path), "manifest": str(manifest.path), "report": report,
            "seconds": job["seconds"], "stages": stages_summary, "artifacts": manifest.data["artifacts"]}


def _cluster_info() -> dict[str, Any]:
    """Cluster resources, and the WORKER_ENV variables as a Ray worker sees them (proof they reach workers)."""
    try:
        import ray

        from raydistill.stages.ray_init import WORKER_ENV

        info: dict[str, Any] = {"resources": ray.cluster_resources(), "nodes": len(ray.nodes())}
    except Exception as e:  # informational only
        return {"error": str(e)}
    try:
        @ray.remote(num_cpus=0)
        def probe(keys: list[str]) -> dict[str, str | None]:
            return {k: os.environ.get(k) for k in keys}

        info["worker_env"] = ray.get(probe.remote(sorted(WORKER_ENV)), timeout=120)
    except Exception as e:  # informational only
        info["worker_env"] = {"error": f"{type(e).__name__}: {e}"}
    return info


def _start_job(manifest: Manifest, cfg: RootConfig, dcfg: DistillConfig) -> dict[str, Any]:
    data = manifest.data
    data.setdefault("created", _now())
    # We hold the run_dir lock, so anything still "running" belongs to a job that was killed.
    for old in data["jobs"]:
        if old.get("status") == "running":
            old["status"] = "interrupted"
    for rec in data["stages"].values():
        if rec.get("status") == "running":
            rec["status"] = "interrupted"
    data["config"] = cfg.model_dump(mode="json")
    data["distill"] = dcfg.model_dump(mode="json")
    data["versions"] = package_versions()
    job = {"started": _now(), "status": "running", "host": socket.gethostname(), "pid": os.getpid(),
           "ray_job": _ray_job_id(), "argv": sys.argv,
           "stages": {}}
    data["jobs"].append(job)
    manifest.save()
    return job


def _check_fingerprints(manifest: Manifest, cfg: RootConfig, dcfg: DistillConfig, fps: dict[str, str]) -> None:
    """Stop (or move stale outputs aside) where run_dir holds a stage made under a different config."""
    for i, stage in enumerate(PIPELINE):
        rec = manifest.stages.get(stage)
        if not rec or rec.get("fingerprint") in (None, fps[stage]):
            continue
        diff = config_diff(rec.get("inputs", {}), stage_inputs(cfg, stage))
        upstream_changed = [u for u in UPSTREAM[stage] if manifest.stages.get(u, {}).get("fingerprint")
                            not in (None, fps[u])]
        why = "; ".join(diff) or (f"upstream changed: {', '.join(upstream_changed)}" if upstream_changed
                                  else "fingerprint differs")
        if dcfg.on_config_change == "error":
            raise ConfigChanged(
                f"{cfg.run_path} holds {stage!r} output ({rec.get('status')}) made under a different config: "
                f"{why}. Use a new run_dir, or distill.on_config_change=rerun (--on-config-change rerun) to move "
                f"it and everything after it aside and redo it")
        later = list(PIPELINE[i:])
        moved = _archive(later, cfg)
        for s in later:
            manifest.stages.pop(s, None)
        manifest.save()
        _say(f"config changed for {stage} ({why}); moved aside: {', '.join(moved) or 'nothing'}; redoing "
             f"{', '.join(later)}")
        return


def _check_selection(cfg: RootConfig, selected: list[str], manifest: Manifest, fps: dict[str, str]) -> None:
    """Every selected stage's inputs are either produced by this job or already done (before running any)."""
    for stage in selected:
        for up in UPSTREAM[stage]:
            if up in selected or (up == "index" and not index_needed(cfg)):
                continue
            if not _stage_done(up, cfg, manifest.stages.get(up), fps[up]):
                raise DistillError(f"{stage} needs the output of {up!r}, which is not done in {cfg.run_path} "
                                   f"and not in distill.stages {selected}; add it (--stages)")


def _run_stage(stage: str, tag: str, cfg: RootConfig, manifest: Manifest, fps: dict[str, str],
               selected: list[str], ensure_ray: Any) -> dict[str, Any]:
    if stage == "index" and not index_needed(cfg):
        _say(f"{tag}: skipped (retrieval.enabled is false)")
        return {"action": "disabled"}
    rec = manifest.stages.get(stage) or {}
    module = load_stage(stage)
    if _stage_done(stage, cfg, rec, fps[stage], module):
        if not rec:
            log.warning("%s: output already in %s but not in the manifest (made by `raydistill %s`?); adopting it",
                        stage, cfg.run_path, stage)
            rec = manifest.stages[stage] = {"status": "done", "adopted": True}
        rec.setdefault("config", cfg.model_dump(mode="json"))  # the config its output was made with (kept)
        rec.update(fingerprint=fps[stage], inputs=stage_inputs(cfg, stage), status="done", skipped_at=_now())
        _say(f"{tag}: skipped (done for this config, fingerprint {fps[stage]})")
        return {"action": "skipped"}
    if stage not in selected:
        _say(f"{tag}: not selected (distill.stages)")
        return {"action": "not-selected"}
    ensure_ray()
    _say(f"{tag}: running (fingerprint {fps[stage]})")
    rec = manifest.stages[stage] = {"status": "running", "fingerprint": fps[stage],
                                    "inputs": stage_inputs(cfg, stage), "config": cfg.model_dump(mode="json"),
                                    "started": _now()}
    manifest.save()
    t0 = time.perf_counter()
    try:
        summary = module.run(cfg)
    except BaseException as e:
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", seconds=round(time.perf_counter() - t0, 3))
        manifest.save()
        _say(f"{tag}: FAILED after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}")
        raise
    seconds = round(time.perf_counter() - t0, 3)
    if not module.is_done(cfg):
        rec.update(status="incomplete", seconds=seconds, summary=_jsonable(summary))
        manifest.save()
        raise DistillError(f"stage {stage!r} returned but its is_done() is still false for this config; "
                           f"see its summary in {manifest.path}")
    rec.update(status="done", finished=_now(), seconds=seconds, summary=_jsonable(summary))
    manifest.save()
    _say(f"{tag}: done in {seconds:.1f} s")
    return {"action": "ran", "seconds": seconds}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _deploy(cfg: RootConfig, manifest: Manifest) -> dict[str, Any]:
    """Start the Serve app for the student; `serve.adapter: auto` picks this run's agent adapter."""
    serve_stage = load_stage("serve")
    adapter = cfg.student.lora_adapter or cfg.run_path / "train" / "agent" / "adapter"
    if cfg.serve.adapter == "auto" and not (Path(adapter) / "adapter_config.json").exists():
        raise DistillError(f"distill.deploy: no agent adapter at {adapter} (train.kinds must include 'agent'); "
                           "set serve.adapter=null to serve the base model on purpose")
    if cfg.ray.address in (None, "local") and not os.environ.get("RAY_ADDRESS"):
        log.warning("distill.deploy with a local Ray started by this job: the app stops when the job ends")
    _say(f"deploy: starting the Serve app ({cfg.student.model}, adapter {cfg.serve.adapter})")
    t0 = time.perf_counter()
    deploy_fn = getattr(serve_stage, "deploy", None) or serve_stage.run
    summary = deploy_fn(cfg)
    seconds = round(time.perf_counter() - t0, 3)
    manifest.data["serve"] = _jsonable(summary)
    _say(f"deploy: up in {seconds:.1f} s at {summary.get('url') if isinstance(summary, dict) else summary}")
    return {"action": "ran", "seconds": seconds}


def is_done(cfg: RootConfig) -> bool:
    """Every stage the job would run is done for this config (and recorded under the same fingerprints)."""
    return all(row["action"] in ("skip", "disabled", "not-selected") for row in plan(cfg))


# -------------------------------------------------------------------------------------------------- CLI


def _clear_errors() -> tuple[type[BaseException], ...]:
    """DistillError plus the stages' own "bad input / cannot proceed" errors (those that are loaded)."""
    found: list[type[BaseException]] = [DistillError]
    for module_name, names in (("raydistill.stages.generate", ("StageError",)),
                               ("raydistill.stages.train", ("TrainError",)),
                               ("raydistill.sft", ("SftDataError",)),
                               ("raydistill.config", ("ConfigError",)),
                               ("raydistill.data.records", ("DataError",))):
        module = sys.modules.get(module_name)
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated subset of {','.join(PIPELINE)} to run (default: all)")
    parser.add_argument("--deploy", action="store_true", default=None,
                        help="after evaluate, deploy the student as the Serve app (cluster use)")
    branch = parser.add_mutually_exclusive_group()
    branch.add_argument("--cot-branch", dest="cot_branch", action="store_true", default=None,
                        help="add the CoT-distillation baseline branch (generate/train/evaluate 'cot')")
    branch.add_argument("--no-cot-branch", dest="cot_branch", action="store_false",
                        help="agent branch only: drop 'cot' from generate/train/evaluate")
    parser.add_argument("--on-config-change", choices=("error", "rerun"), default=None,
                        help="run_dir holds a stage made under another config: stop (default) or redo it")
    parser.add_argument("--plan", action="store_true",
                        help="print what would run and what would be skipped, then exit (starts no Ray)")


def section_from_args(cfg: RootConfig, args: argparse.Namespace) -> DistillConfig:
    """The distill section from the config, with the CLI flags on top."""
    dcfg = distill_section(cfg)
    update: dict[str, Any] = {}
    stages = getattr(args, "stages", None)
    if stages:
        names = [s.strip() for s in stages.split(",") if s.strip()]
        unknown = [s for s in names if s not in PIPELINE]
        if unknown:
            raise DistillError(f"--stages: unknown stage(s) {unknown}; choose from {list(PIPELINE)}")
        update["stages"] = names
    for key in ("deploy", "cot_branch", "on_config_change"):
        value = getattr(args, key, None)
        if value is not None:
            update[key] = value
    return DistillConfig.model_validate({**dcfg.model_dump(), **update}) if update else dcfg


def _exit_on_sigterm() -> None:
    """`ray job stop` and Kubernetes send SIGTERM: exit through Python so the manifest records the stop."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(cfg: RootConfig, args: argparse.Namespace) -> int:
    _exit_on_sigterm()
    try:
        dcfg = section_from_args(cfg, args)
        if getattr(args, "plan", False):
            for row in plan(cfg, dcfg):
                print(f"{row['stage']:<9} {row['action']:<13} {row['fingerprint']}")
            return 0
        summary = run(cfg, dcfg)
    except _clear_errors() as e:
        # Errors whose message already says what is wrong and what to do: no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("run_dir", "manifest", "report", "seconds")}, indent=2))
    return 0
