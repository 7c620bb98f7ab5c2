"""Backend registry, config validation, the scripted engine, and vLLM argument mapping (no vLLM needed)."""

from __future__ import annotations

import asyncio

import pytest

from raydistill.config import ConfigError, load_config
from raydistill.config.engine import EngineConfig
from raydistill.engines import ChatRequest, Completion, SamplingParams, available_backends, create_engine
from raydistill.engines.base import EngineError, get_engine_class


def test_backends_are_found_by_module_name():
    assert {"transformers", "vllm", "openai", "scripted"} <= set(available_backends())
    assert get_engine_class("scripted").backend == "scripted"


def test_unknown_backend_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown engine backend 'nope'.*scripted"):
        load_config(None, ["student.backend=nope"])
    with pytest.raises(EngineError, match="unknown engine backend"):
        get_engine_class("base")


def test_scripted_engine_applies_stops_n_and_script():
    eng = create_engine(EngineConfig(backend="scripted", model="s", script=["a STOP b", "second"]))
    req = ChatRequest(messages=[{"role": "user", "content": "hi there"}])
    [c] = asyncio.run(eng.generate(req, SamplingParams(stop=("STOP",))))
    assert c.text == "a " and c.finish_reason == "stop" and c.stop_reason == "STOP" and c.prompt_tokens == 2
    cs = asyncio.run(eng.generate(req, SamplingParams(n=2, logprobs=True)))
    assert [x.text for x in cs] == ["second", "second"] and cs[0].cumulative_logprob == 0.0
    assert asyncio.run(eng.generate(req, SamplingParams()))[0].text == "a STOP b"  # cycles
    eng = create_engine(EngineConfig(backend="scripted", model="s"), outputs=[[Completion("x", cumulative_logprob=-1.0)]])
    with pytest.raises(EngineError, match="n=2"):
        asyncio.run(eng.generate(req, SamplingParams(n=2)))


def test_vllm_engine_args_mapping():
    from raydistill.engines.vllm import engine_args_kwargs

    cfg = EngineConfig(backend="vllm", model="m", load_format="dummy", max_num_seqs=512, lora_adapter="/a",
                       tensor_parallel_size=2, engine_kwargs={"max_num_batched_tokens": 8192})
    kw = engine_args_kwargs(cfg, "/models/m", "/models/m")
    assert kw["load_format"] == "dummy" and kw["enable_prefix_caching"] and kw["max_num_seqs"] == 512
    assert kw["enable_lora"] and kw["max_lora_rank"] == 64 and kw["tensor_parallel_size"] == 2
    assert kw["max_num_batched_tokens"] == 8192 and kw["disable_log_stats"]


def test_vllm_is_imported_only_when_the_backend_is_created():
    import importlib.util
    import sys

    import raydistill.engines.vllm  # noqa: F401  (the module itself imports no vllm)

    assert "vllm" not in sys.modules
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError):
            create_engine(EngineConfig(backend="vllm", model="tiny:qwen2-tiny"))
