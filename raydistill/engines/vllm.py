"""vLLM (0.26) in-process: `AsyncLLM` with continuous batching, prefix caching, n > 1 in one request, LoRA.

Prompts are rendered here with the model's own HF tokenizer (chat template, `continue_final_message` for
the first-thought prefix) and handed to vLLM as token ids, so every backend renders identically. vLLM is
imported only when this backend is created (it is not installed on CPU machines); engine start takes
minutes on a GPU, so create one engine per process and share it between all episodes.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from raydistill.config.engine import EngineConfig
from raydistill.engines.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineError,
    PromptTooLongError,
    SamplingParams,
    check_prompt_fits,
    register_engine,
)
from raydistill.engines.rendering import render_prompt_ids

log = logging.getLogger(__name__)


def engine_args_kwargs(cfg: EngineConfig, model_path: str, tokenizer_path: str) -> dict[str, Any]:
    """AsyncEngineArgs fields for `cfg` (separate so it is testable without vLLM)."""
    kw: dict[str, Any] = dict(
        model=model_path, tokenizer=tokenizer_path, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
        tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
        enable_prefix_caching=cfg.enable_prefix_caching, load_format=cfg.load_format, max_num_seqs=cfg.max_num_seqs,
        seed=cfg.seed, enforce_eager=cfg.enforce_eager, disable_log_stats=True,
    )
    if cfg.lora_adapter:
        kw.update(enable_lora=True, max_loras=1, max_lora_rank=cfg.max_lora_rank)
    kw.update(cfg.engine_kwargs)
    return kw


@register_engine("vllm")
class VLLMEngine(Engine):
    """`cfg.model`: HF id or dir (`tiny:` names resolve to dirs); `cfg.load_format="dummy"` for random weights.
    With `cfg.lora_adapter`, every request runs through that adapter (LoRARequest by name).
    """

    def __init__(self, cfg: EngineConfig) -> None:
        super().__init__(cfg)
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
        import vllm  # noqa: F401  (first: fail fast where vLLM is not installed)
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from raydistill.models import resolve_model

        self.model_path = resolve_model(cfg.model)
        tok_path = resolve_model(cfg.tokenizer) if cfg.tokenizer else self.model_path
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
        self.max_model_len = cfg.max_model_len
        self.lora_request = None
        if cfg.lora_adapter:
            from vllm.lora.request import LoRARequest

            adapter = resolve_model(cfg.lora_adapter)
            name = os.path.basename(os.path.normpath(adapter)) or "adapter"
            self.lora_request = LoRARequest(lora_name=name, lora_int_id=1, lora_path=adapter)
        args = AsyncEngineArgs(**engine_args_kwargs(cfg, self.model_path, tok_path))
        self.llm = AsyncLLM.from_engine_args(args)
        self.placement = {"pinned": False, "why": "pin_cpus is off"}
        if cfg.pin_cpus:
            from raydistill.engines.cpu_pinning import pin_engine

            self.placement = pin_engine()
            if not self.placement["pinned"]:
                log.info("vLLM engine core not pinned: %s", self.placement["why"])
        # As vLLM's own API server does after start-up: move the start-up heap (torch, vLLM, the tokenizer: hundreds of
        # thousands of objects) out of the collector's reach, so a full collection does not walk it (a full pass took
        # 0.3 s on the CPU box over the 480k objects of torch, transformers, ray and this package alone). This
        # process's event loop also runs AsyncLLM's output handler and our episodes; its 0.4-0.5 s stalls on the GPU
        # runs stayed with the heap frozen (docs/benchmarks.md, fourth session), so they are not shown to be GC.
        from vllm.utils.gc_utils import freeze_gc_heap

        freeze_gc_heap()
        self.counters = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0}
        self._closed = False

    def _vllm_params(self, p: SamplingParams, max_tokens: int) -> Any:
        """vLLM detokenizes token by token on the AsyncLLM output handler, the event loop our episodes share;
        that is needed only to find stop strings, so without them the final ids are decoded once instead."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VSamplingParams(
            n=p.n, temperature=p.temperature, top_p=p.top_p, max_tokens=max_tokens, stop=list(p.stop) or None,
            seed=p.seed, logprobs=0 if p.logprobs else None, ignore_eos=p.ignore_eos,
            output_kind=RequestOutputKind.FINAL_ONLY, detokenize=bool(p.stop),
        )

    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        if self._closed:
            raise EngineError("engine is closed")
        ids = render_prompt_ids(self.tokenizer, request)
        check_prompt_fits(len(ids), self.max_model_len)
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        vparams = self._vllm_params(params, max_tokens)
        final = None
        try:
            async for out in self.llm.generate({"prompt_token_ids": ids}, vparams, uuid.uuid4().hex,
                                               lora_request=self.lora_request):
                final = out
        except ValueError as e:
            msg = str(e)
            if "longer than the maximum model length" in msg or "maximum context length" in msg:
                raise PromptTooLongError(msg) from e
            raise EngineError(f"vllm rejected the request: {msg}") from e
        if final is None:
            raise EngineError("vllm returned no output")
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(ids)
        comps = []
        for o in sorted(final.outputs, key=lambda o: o.index):
            toks = list(o.token_ids)
            self.counters["generated_tokens"] += len(toks)
            finish = o.finish_reason if o.finish_reason in ("stop", "length", "abort") else "stop"
            stop_reason = o.stop_reason if isinstance(o.stop_reason, str) else None
            text = o.text if vparams.detokenize else self.tokenizer.decode(toks, skip_special_tokens=True)
            comps.append(Completion(text=text, token_ids=toks, prompt_tokens=len(ids), completion_tokens=len(toks),
                                    finish_reason=finish, stop_reason=stop_reason,
                                    cumulative_logprob=o.cumulative_logprob if params.logprobs else None))
        return comps

    async def reset_prefix_cache(self) -> None:
        await self.llm.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.llm.shutdown()
