"""LLM engines: one async interface (`Engine.generate`), one module per backend, created by name.

    engine = create_engine(cfg.student)            # EngineConfig -> Engine (imports only that backend)
    [c] = await engine.generate(ChatRequest(messages=[...]), SamplingParams(max_tokens=64, stop=("<end_code>",)))
"""

from raydistill.engines.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineError,
    PromptTooLongError,
    SamplingParams,
    available_backends,
    create_engine,
    get_engine_class,
    register_engine,
)

__all__ = [
    "ChatRequest",
    "Completion",
    "Engine",
    "EngineError",
    "PromptTooLongError",
    "SamplingParams",
    "available_backends",
    "create_engine",
    "get_engine_class",
    "register_engine",
]
