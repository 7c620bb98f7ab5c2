"""One tiny transformers engine per test module (loading it costs ~1 s; tests share it across event loops)."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="module")
def tf_engine(tiny_model_dir):
    from raydistill.config.engine import EngineConfig
    from raydistill.engines import create_engine

    engine = create_engine(EngineConfig(model="tiny:qwen2-tiny", max_batch_size=16, max_model_len=2048, cpu_threads=1))
    yield engine
    asyncio.run(engine.aclose())
