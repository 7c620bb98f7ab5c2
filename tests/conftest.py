"""Shared fixtures: a real local Ray on 127.0.0.1 sized for a 2-core box, and tiny real checkpoints."""

from __future__ import annotations

import os

# Keep every Ray listener on loopback (ray.init(_node_ip_address=...) alone does not do it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """A tiny random-weight Qwen2 checkpoint + trained tokenizer, built once and cached."""
    from raydistill.models import resolve_model

    return resolve_model("tiny:qwen2-tiny")


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster on 127.0.0.1. Actors in tests must ask for fractional CPUs."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
        log_to_driver=True, configure_logging=False,
        runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}},
    )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
