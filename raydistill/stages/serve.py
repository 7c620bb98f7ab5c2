"""Serve the distilled student agent over HTTP with Ray Serve (`raydistill serve`).

Deployments (each scaled and placed on its own):
- `StudentEngine`: the student model (vLLM with the LoRA adapter on GPU, transformers on CPU). Every step of
  every episode is one `generate` call here; with sag that call asks for n samples, so the shared prefix is
  computed once.
- `SandboxPool`: owns the sandbox host actors; an episode gets one sandbox (sticky to its actor) and sag
  forks it so the n candidates execute in parallel, each on its own copy of the state.
- `Retriever`: the faiss index + embedder behind `web_search`; concurrent queries are batched (`serve.batch`).
- `StudentAgent`: the FastAPI ingress (`raydistill.serving.create_app`): `/v1/solve`, `/v1/chat/completions`,
  `/healthz`, `/docs`. Episodes run here (asyncio), calling the three deployments above.

`build_app(cfg_or_args)` returns the Serve Application; it is also the import path of configs/serve_app.yaml
(`serve run configs/serve_app.yaml`, KubeRay RayService), where `args` are {config: <yaml>, <key.sub>: value}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from typing import Any

from ray import serve
from ray.serve import Application

from raydistill.config import RootConfig, load_config
from raydistill.config.engine import EngineConfig
from raydistill.engines.base import ChatRequest, Completion, Engine, SamplingParams
from raydistill.serving.student import model_label, resolve_adapter, student_engine_cfg

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- deployments


@serve.deployment(name="StudentEngine")
class StudentEngine:
    """One student engine per replica; concurrent calls are batched by the backend."""

    def __init__(self, engine_cfg: dict, factory: str | None = None) -> None:
        from raydistill.engines import create_engine

        self.cfg = EngineConfig.model_validate(engine_cfg)
        self.engine = _import(factory)(self.cfg) if factory else create_engine(self.cfg)

    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        return await self.engine.generate(request, params)

    async def info(self) -> dict:
        return {"backend": self.engine.backend, "model": self.engine.model_name, "describe": self.engine.describe(),
                "lora_adapter": self.cfg.lora_adapter, "lora": await lora_status(self.engine),
                "stats": self.engine.stats()}


async def lora_status(engine: Any) -> dict | None:
    """What the engine itself says about the adapter (unwrapping benchmark wrappers): the vLLM LoRARequest every
    request carries and the adapter ids vLLM has loaded (`AsyncLLM.list_loras`: an id appears once a request
    ran through it); for transformers, that the adapter was merged into the weights at load."""
    while hasattr(engine, "inner"):
        engine = engine.inner
    req = getattr(engine, "lora_request", None)
    if req is not None:
        out: dict = {"name": req.lora_name, "id": req.lora_int_id, "path": req.lora_path}
        try:
            out["loaded_ids"] = sorted(await engine.llm.list_loras())
        except Exception as e:  # informational only
            out["loaded_ids_error"] = f"{type(e).__name__}: {e}"
        return out
    if getattr(engine, "cfg", None) is not None and engine.cfg.lora_adapter:
        return {"path": engine.cfg.lora_adapter, "merged": True}
    return None


def _import(path: str) -> Any:
    import importlib

    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"serve.engine_factory must look like 'module:function', got {path!r}")
    return getattr(importlib.import_module(module), attr)


class ServeEngineProxy(Engine):
    """An Engine whose `generate` is a call to the StudentEngine deployment (cancellation propagates)."""

    def __init__(self, cfg: EngineConfig, handle: Any, name: str) -> None:
        super().__init__(cfg)
        self.handle = handle
        self.backend = cfg.backend
        self.model_name = name

    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        return await self.handle.generate.remote(request, params)

    def describe(self) -> str:
        return f"serve:{self.backend}:{self.model_name}"


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    """The run's index behind `web_search(query) -> str`. A `RetrieverService` (raydistill.actors.retriever)
    coalesces the queries of concurrent episodes into one embedding + faiss batch."""

    def __init__(self, cfg_json: str) -> None:
        from raydistill.actors.retriever import RetrieverService
        from raydistill.retrieval import resolve_index_dir

        cfg = RootConfig.model_validate_json(cfg_json)
        r = cfg.retrieval
        self.service = RetrieverService(
            str(resolve_index_dir(cfg)), top_k=r.top_k, max_batch_size=r.max_batch_size,
            batch_wait_ms=r.batch_wait_ms, fp16=r.fp16, nprobe=r.nprobe, ef_search=r.hnsw_ef_search,
            index_device=r.index_device if r.server_num_gpus > 0 else "cpu")

    async def web_search(self, query: str) -> str:
        return await self.service.web_search(query)

    async def passages(self, query: str, k: int) -> list[str]:
        hits = await self.service.search([query], k)
        return [h.contents for h in hits[0]]

    async def stats(self) -> dict:
        return await self.service.stats()


def make_serve_web_search(handle: Any):
    """The sandbox tool: an async `web_search(query) -> str` calling the Retriever deployment."""

    async def web_search(query: str) -> str:
        """Semantic search over the Wikipedia corpus; returns the top passages as text."""
        from raydistill.retrieval.tool import check_query

        return await handle.web_search.remote(check_query(query))

    return web_search


def wait_pool_ready(pool: Any, timeout_s: float) -> None:
    """Fail fast (naming the resources) when sandbox host actors cannot start, instead of letting every episode
    that lands on an unschedulable actor hang until its request times out."""
    import ray

    refs = [a.stats.remote() for a in pool.actors]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        cpus = pool.config.pool.num_cpus_per_actor
        raise RuntimeError(f"{len(pending)} of {len(refs)} sandbox host actors did not start within {timeout_s:.0f}s "
                           f"(each asks for {cpus} CPU; cluster has {ray.available_resources().get('CPU', 0):.2f} "
                           "CPUs free): lower sandbox.pool.num_actors / num_cpus_per_actor or add nodes")
    ray.get(ready)


@serve.deployment(name="SandboxPool")
class SandboxPoolDeployment:
    """Owns the sandbox host actors (`sandbox.pool.num_actors`, fractional CPUs). Ingress replicas fetch the
    picklable pool once and create sandboxes on its actors directly (sticky per episode; sag forks live
    next to their parent), so no episode step goes through this replica."""

    def __init__(self, cfg_json: str) -> None:
        from raydistill.actors.sandbox_pool import SandboxPool

        cfg = RootConfig.model_validate_json(cfg_json)
        self._pool = SandboxPool(cfg.sandbox)
        wait_pool_ready(self._pool, cfg.sandbox.start_timeout_s * 2)

    async def pool(self) -> Any:
        return self._pool

    async def stats(self) -> list[dict]:
        return await self._pool.stats()


@serve.deployment(name="StudentAgent")
@serve.ingress()
class StudentAgent:
    """The HTTP ingress: builds the FastAPI app over an EpisodeBackend wired to the other deployments."""

    def __init__(self, cfg_json: str, api_key_sha256: str | None, engine: Any, sandboxes: Any,
                 retriever: Any = None) -> None:
        from raydistill.serving import EpisodeBackend, create_app

        cfg = RootConfig.model_validate_json(cfg_json)
        name = model_label(cfg.student, cfg.student.lora_adapter)
        self.engine = ServeEngineProxy(cfg.student, engine, name)
        self.sandboxes = sandboxes
        self._pool: Any = None
        self._create_timeout_s = cfg.sandbox.start_timeout_s * 2
        self._tools = ({"web_search": make_serve_web_search(retriever)}
                       if retriever is not None and cfg.agent.web_search else {})
        backend = EpisodeBackend(self.engine, sandbox_factory=self._new_sandbox, tools=list(self._tools),
                                 model_name=name, health_extra=self._health)
        self._asgi = create_app(backend, cfg.serve, cfg.agent, watch_disconnect=False,
                                api_key_sha256=api_key_sha256)

    async def _new_sandbox(self) -> Any:
        if self._pool is None:
            self._pool = await self.sandboxes.pool.remote()
        try:
            return await asyncio.wait_for(self._pool.create(tools=self._tools), timeout=self._create_timeout_s)
        except TimeoutError:
            raise RuntimeError(f"no sandbox within {self._create_timeout_s:.0f}s (sandbox hosts overloaded or "
                               "down)") from None

    async def _health(self) -> dict:
        info, sandboxes = await asyncio.gather(self.engine.handle.info.remote(), self.sandboxes.stats.remote())
        return {"engine_stats": info.get("stats", {}), "adapter": info.get("lora_adapter"), "lora": info.get("lora"),
                "sandbox_hosts": len(sandboxes), "sandboxes_open": sum(s.get("sandboxes", 0) for s in sandboxes)}

    def __serve_build_asgi_app__(self):
        return self._asgi


# ----------------------------------------------------------------------------------------------- the app


def _autoscaling(min_r: int, max_r: int, target: float) -> dict:
    if max_r < max(min_r, 1):
        raise ValueError(f"serve: max replicas ({max_r}) is below min replicas ({min_r})")
    return {"min_replicas": min_r, "initial_replicas": max(min_r, 1), "max_replicas": max_r,
            "target_ongoing_requests": target}


def config_from_args(args: dict | RootConfig) -> RootConfig:
    """Serve-config `args` -> RootConfig: `config` (YAML path, optional), `overrides` (list of `a.b=c`), and any
    other key taken as an override (`serve run raydistill.stages.serve:build_app student.model=...`)."""
    if isinstance(args, RootConfig):
        return args
    if not isinstance(args, dict):
        raise TypeError(f"build_app expects a RootConfig or a dict of args, got {type(args).__name__}")
    args = dict(args)
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", None) or [])
    for key, value in args.items():
        overrides.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    return load_config(path, overrides)


def build_app(args: dict | RootConfig) -> Application:
    """The Serve application for a config (or for Serve-config `args`, see `config_from_args`)."""
    from raydistill.serving.app import resolve_api_key

    cfg = config_from_args(args)
    adapter = resolve_adapter(cfg.serve.adapter, cfg.run_path, "agent", cfg.student)
    cfg = cfg.model_copy(update={"student": student_engine_cfg(cfg.student, adapter)})
    cfg_json = cfg.model_dump_json()
    s = cfg.serve
    engine = StudentEngine.options(
        ray_actor_options={"num_cpus": cfg.student.num_cpus, "num_gpus": cfg.student.num_gpus},
        autoscaling_config=_autoscaling(s.engine_min_replicas, s.engine_max_replicas, s.engine_target_ongoing_requests),
        max_ongoing_requests=s.engine_max_ongoing_requests,
    ).bind(cfg.student.model_dump(), s.engine_factory)
    retriever = None
    if cfg.retrieval.enabled and cfg.agent.web_search:
        retriever = RetrieverDeployment.options(
            num_replicas=1,
            ray_actor_options={"num_cpus": cfg.retrieval.server_num_cpus, "num_gpus": cfg.retrieval.server_num_gpus},
            max_ongoing_requests=4096,
        ).bind(cfg_json)
    sandboxes = SandboxPoolDeployment.options(
        num_replicas=1, ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=4096,
    ).bind(cfg_json)
    return StudentAgent.options(
        ray_actor_options={"num_cpus": s.num_cpus},
        autoscaling_config=_autoscaling(s.min_replicas, s.max_replicas, s.target_ongoing_requests),
        max_ongoing_requests=s.max_ongoing_requests,
    ).bind(cfg_json, resolve_api_key(s), engine, sandboxes, retriever)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def run(cfg: RootConfig) -> dict:
    """Deploy the app (HTTP bound to serve.host:serve.port) and return where it listens; does not block."""
    from raydistill.stages.ray_init import init_ray

    init_ray(cfg.ray)
    s = cfg.serve
    t0 = time.perf_counter()
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s + 30})
    adapter = resolve_adapter(s.adapter, cfg.run_path, "agent", cfg.student)
    serve.run(build_app(cfg), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    prefix = s.route_prefix.rstrip("/")
    url = f"http://{_client_host(s.host)}:{s.port}{prefix}"
    return {"url": url, "docs": f"{url}/docs", "app": s.app_name, "host": s.host, "port": s.port,
            "model": model_label(cfg.student, adapter), "adapter": adapter, "engine": cfg.student.backend,
            "seconds": round(time.perf_counter() - t0, 3)}


deploy = run


def is_done(cfg: RootConfig) -> bool:
    """Serving has no finished output; True while the app is running on the connected cluster."""
    try:
        status = serve.status()
        app = status.applications.get(cfg.serve.app_name)
        return app is not None and str(app.status).endswith("RUNNING")
    except Exception:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-block", action="store_true", help="deploy and return (the app keeps running on the "
                        "cluster; with a local Ray it stops when this process exits)")


def main(cfg: RootConfig, args: argparse.Namespace) -> int:
    summary = run(cfg)
    print(f"serving {summary['model']} at {summary['url']} (API docs: {summary['docs']})", flush=True)
    if getattr(args, "no_block", False) or not cfg.serve.blocking:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
    return 0

