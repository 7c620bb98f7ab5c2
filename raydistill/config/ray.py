"""How to reach (or start) the Ray cluster."""

from __future__ import annotations

from pydantic import Field

from raydistill.config.base import Section

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
"""Environment that keeps NVLink multicast off (NCCL, PyTorch symmetric memory, NVSHMEM): on shared multi-GPU
hosts a program using it can take the host's GPUs out of service. Set for Ray workers by
`raydistill.stages.ray_init`, for training processes by `raydistill.train.loop.default_env`; also in
cluster/runtime_env.yaml, the KubeRay manifests and the GPU Dockerfile, so it holds for workers started by
anything, not only by our drivers."""


class RayConfig(Section):
    address: str | None = None
    """None or "local": start a local Ray on 127.0.0.1; "auto" or ray://...: join a cluster."""
    num_cpus: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    object_store_memory: int | None = None
    include_dashboard: bool = False
