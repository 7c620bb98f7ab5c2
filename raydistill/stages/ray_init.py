"""Start or join Ray the same way everywhere: loopback-only locally, env propagated to workers."""

from __future__ import annotations

import logging
import os

from raydistill.config.ray import RayConfig

log = logging.getLogger(__name__)

# Propagated to every Ray worker. NCCL_NVLS_ENABLE & co keep NVLink multicast off on shared multi-GPU hosts.
WORKER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
_PASS_THROUGH = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAYDISTILL_CACHE", "HF_HOME", "PYTHONPATH")


def worker_env() -> dict[str, str]:
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in _PASS_THROUGH if k in os.environ})
    return env


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
