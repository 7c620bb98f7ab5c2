"""Real `ray start --head` clusters on 127.0.0.1 that the tests start and stop themselves.

The head itself (loopback only, unique ports and temp dir, token auth, teardown that ends only this head's
processes, never `ray stop`) is `raydistill.stages.local_head.LocalRayHead`; this file only adds the test
defaults (2 CPUs, offline Hugging Face, `ray` CLI run from the repo root) and the teardown.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raydistill.stages.local_head import LocalRayHead

REPO = Path(__file__).resolve().parents[2]
TEST_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def ray_head_factory():
    """Start heads with `ray_head_factory(**kwargs)` (LocalRayHead's arguments); all are stopped at teardown."""
    heads: list[LocalRayHead] = []

    def make(num_cpus: float = 2, timeout_s: float = 120, **kwargs) -> LocalRayHead:
        kwargs["extra_env"] = {**TEST_ENV, **(kwargs.get("extra_env") or {})}
        kwargs.setdefault("cli_cwd", REPO)
        head = LocalRayHead(num_cpus=num_cpus, **kwargs)
        heads.append(head)
        return head.start(timeout_s)

    yield make
    for head in heads:
        head.stop()
