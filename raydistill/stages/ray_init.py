"""Start or join Ray the same way everywhere: loopback-only locally, env propagated to workers.

Why the merge with the job's runtime env: under `ray job submit --runtime-env ...` the driver's
`ray.init(runtime_env=...)` is merged with the job's, and Ray refuses (ValueError) when both set the same
environment variable. So the job's env_vars win: a variable the job sets is left out of ours (its value
already reaches every worker through the job), and ours only fill the gaps.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from raydistill.config.ray import MULTICAST_OFF, RayConfig

log = logging.getLogger(__name__)

# Propagated to every Ray worker.
WORKER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",
    **MULTICAST_OFF,
}
_PASS_THROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAYDISTILL_CACHE", "HF_HOME", "PYTHONPATH")
JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in a driver started by `ray job submit`


def job_env_vars(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """env_vars of the `ray job submit` runtime env this driver runs under ({} when not a submitted job)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(JOB_CONFIG_VAR)
    if not raw:
        return {}
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        log.warning("%s is not JSON; treating the job as having no env_vars", JOB_CONFIG_VAR)
        return {}
    env_vars = runtime_env.get("env_vars") if isinstance(runtime_env, dict) else None
    return {str(k): str(v) for k, v in (env_vars or {}).items()}


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The env_vars this driver adds to the runtime env: defaults, then this process's values, minus the job's.

    A variable already set in this process wins over the default (e.g. NCCL_NVLS_ENABLE exported by the
    launcher); one the submitted job's runtime env sets is left to the job (no merge conflict, job wins).
    """
    environ = os.environ if environ is None else environ
    env = {k: environ.get(k, v) for k, v in WORKER_ENV.items()}
    env.update({k: environ[k] for k in _PASS_THROUGH if k in environ})
    job = job_env_vars(environ)
    return {k: v for k, v in env.items() if k not in job}


def init_ray(cfg: RayConfig) -> None:
    """Connect to `cfg.address`, or start a local Ray bound to 127.0.0.1. No-op when already connected."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": worker_env()}
    address = cfg.address
    if address in (None, "local"):
        address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                 object_store_memory=cfg.object_store_memory, include_dashboard=cfg.include_dashboard,
                 _node_ip_address="127.0.0.1", runtime_env=runtime_env, configure_logging=False)
        log.info("started local Ray on 127.0.0.1: %s", ray.cluster_resources())
    else:
        ray.init(address=address, runtime_env=runtime_env, configure_logging=False)
        log.info("joined Ray at %s: %s", address, ray.cluster_resources())
