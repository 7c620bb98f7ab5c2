"""The one async LLM interface every backend implements, plus the backend registry.

Episodes call `generate` one request at a time and many at once (asyncio); a backend batches concurrent
calls itself (vLLM: continuous batching; transformers: a micro-batching queue; openai: the server does).
Adding a backend is one file, `raydistill/engines/<name>.py`, whose class carries `@register_engine("<name>")`:
`create_engine` imports that module by the backend's name on first use, so nothing else needs editing.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from raydistill.config.engine import EngineConfig

FinishReason = Literal["stop", "length", "abort"]


class EngineError(RuntimeError):
    """A request could not be served (bad request, prompt over the context window, backend failure)."""


class PromptTooLongError(EngineError):
    """The prompt alone does not fit the model's context window; the episode ends with this error."""


def check_prompt_fits(prompt_tokens: int, max_model_len: int) -> None:
    """Raise `PromptTooLongError` when a prompt leaves no room to generate (same message in every backend)."""
    if prompt_tokens >= max_model_len:
        raise PromptTooLongError(f"prompt has {prompt_tokens} tokens, context window is {max_model_len}")


@dataclass
class SamplingParams:
    """What to sample. `stop` strings are excluded from the returned text (vLLM/OpenAI convention)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    """Fill `Completion.cumulative_logprob` (summed log-probability of the generated tokens)."""
    ignore_eos: bool = False
    """Generate exactly `max_tokens` (benchmarks with fixed token counts)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    def replace(self, **changes: Any) -> SamplingParams:
        return SamplingParams(**{**asdict(self), **changes})


@dataclass
class ChatRequest:
    """One prompt: chat `messages` (rendered with the model's chat template) or raw `prompt_token_ids`.

    `continue_final_message`: the last message is an unfinished assistant turn that the model continues
    (no new turn is opened) - used by the first-thought prefix.
    """

    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[int] | None = None
    continue_final_message: bool = False

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt_token_ids is None):
            raise ValueError("ChatRequest needs exactly one of `messages` or `prompt_token_ids`")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("ChatRequest.messages is empty")
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise ValueError(f"ChatRequest.messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
            if self.continue_final_message and self.messages[-1]["role"] != "assistant":
                raise ValueError("continue_final_message needs the last message to be an assistant message")
        elif self.continue_final_message:
            raise ValueError("continue_final_message applies to chat messages, not to prompt_token_ids")


@dataclass
class Completion:
    """One generated sequence. `token_ids` are the generated tokens only (the prompt is not repeated)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "stop"
    stop_reason: str | int | None = None
    """The stop string that ended generation (None for EOS or length)."""
    cumulative_logprob: float | None = None
    token_logprobs: list[float] | None = None
    """Per generated token (when logprobs were asked for and the backend reports them)."""


class Engine(ABC):
    """Async text generation. Subclasses set `backend` via `@register_engine` and implement `generate`."""

    backend: str = "?"

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.model_name: str = cfg.model
        self.tokenizer: Any = None
        """A HF tokenizer when the backend has one locally (transformers, vllm; openai if `cfg.tokenizer`)."""

    @abstractmethod
    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        """Return `params.n` completions for one request."""

    async def generate_batch(
        self, requests: Sequence[ChatRequest], params: SamplingParams
    ) -> list[list[Completion]]:
        """Many requests with the same params; concurrent `generate` calls, batched by the backend."""
        return list(await asyncio.gather(*(self.generate(r, params) for r in requests)))

    async def reset_prefix_cache(self) -> None:
        """Drop cached prefixes (benchmarks reset between variants). No-op where there is no such cache."""
        return None

    def stats(self) -> dict[str, Any]:
        """Backend counters (requests, batches, tokens) for benchmarks and logs."""
        return {}

    async def aclose(self) -> None:
        """Release the model/connections. Safe to call twice."""
        return None

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def describe(self) -> str:
        return f"{self.backend}:{self.model_name}"


_REGISTRY: dict[str, type[Engine]] = {}


def register_engine(name: str) -> Callable[[type[Engine]], type[Engine]]:
    """Class decorator: make a backend available to `create_engine` under `name`."""

    def deco(cls: type[Engine]) -> type[Engine]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"engine backend {name!r} registered twice ({_REGISTRY[name]} and {cls})")
        cls.backend = name
        _REGISTRY[name] = cls
        return cls

    return deco


def backend_module(name: str) -> str:
    return f"{__package__}.{name}"


def backend_exists(name: str) -> bool:
    """True when `raydistill/engines/<name>.py` exists (checked without importing it)."""
    if name in _REGISTRY:
        return True
    if not name.isidentifier() or name == "base":
        return False
    return importlib.util.find_spec(backend_module(name)) is not None


def get_engine_class(name: str) -> type[Engine]:
    if name not in _REGISTRY:
        if not backend_exists(name):
            known = ', '.join(repr(b) for b in available_backends())
            raise EngineError(f"unknown engine backend {name!r}; available: {known}")
        importlib.import_module(backend_module(name))
        if name not in _REGISTRY:
            raise EngineError(f"module {backend_module(name)} did not register an engine named {name!r}")
    return _REGISTRY[name]


def available_backends() -> list[str]:
    import pkgutil

    pkg = importlib.import_module(__package__)
    names = {m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")}
    names -= {"base", "rendering", "openai_server", "fixed_action", "cpu_pinning"}
    return sorted(names | set(_REGISTRY))


def create_engine(cfg: EngineConfig, **kwargs: Any) -> Engine:
    """Build the engine named by `cfg.backend` (imports only that backend's module). Extra kwargs go to it."""
    return get_engine_class(cfg.backend)(cfg, **kwargs)
