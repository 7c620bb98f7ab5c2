"""Fixtures for the sandbox tests (helpers live in sbhelpers.py)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session", autouse=True)
def _sandbox_logging():
    import logging

    logging.getLogger("raydistill.sandbox").setLevel(logging.INFO)
    yield


@pytest.fixture(scope="module")
def ray_sandbox_cluster():
    """A real local Ray on 127.0.0.1 (2 CPUs; actors ask for fractions)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
    yield ray
    ray.shutdown()
