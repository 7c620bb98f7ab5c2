"""CPU / test backend on Hugging Face transformers, with real batching.

Concurrent `generate` calls land in a queue; a batcher task takes every request waiting (up to
`cfg.max_batch_size` sequences with identical sampling params), left-pads them into one tensor and decodes
them together with `model.generate` in a worker thread, so the event loop never blocks and the model
always sees as full a batch as the load allows. Stop strings, n > 1, seeds, summed log-probabilities,
finish reasons and continuing a final assistant message behave as in the vLLM backend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from raydistill.config.engine import EngineConfig
from raydistill.engines.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineError,
    SamplingParams,
    check_prompt_fits,
    register_engine,
)
from raydistill.engines.rendering import render_prompt_ids, truncate_at_stop

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


@dataclass
class _Item:
    ids: list[int]
    params: SamplingParams
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


def _key(p: SamplingParams) -> tuple:
    return (p.n, p.temperature, p.top_p, p.max_tokens, p.stop, p.seed, p.logprobs, p.ignore_eos)


@dataclass
class _LoopState:
    queue: asyncio.Queue
    task: asyncio.Task | None = None
    backlog: deque = field(default_factory=deque)


@register_engine("transformers")
class TransformersEngine(Engine):
    """`cfg.model` (HF dir/id or `tiny:<name>`) loaded with `from_pretrained`; optional PEFT adapter merged."""

    def __init__(self, cfg: EngineConfig) -> None:
        super().__init__(cfg)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from raydistill.models import resolve_model

        self.model_path = resolve_model(cfg.model)
        tok_path = resolve_model(cfg.tokenizer) if cfg.tokenizer else self.model_path
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
        hf_logging.disable_progress_bar()
        dtype = getattr(torch, _DTYPES[cfg.dtype]) if cfg.dtype != "auto" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        if cfg.lora_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, resolve_model(cfg.lora_adapter)).merge_and_unload()
        model.eval()
        self.model = model
        gc = model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        limit = getattr(model.config, "max_position_embeddings", None) or cfg.max_model_len
        self.max_model_len = min(cfg.max_model_len, limit)
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tf-engine",
                                            initializer=self._init_worker)
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._stop_criteria: dict[tuple[str, ...], Any] = {}
        self._closed = False
        self.counters = {"requests": 0, "batches": 0, "sequences": 0, "prompt_tokens": 0, "generated_tokens": 0,
                         "busy_s": 0.0}
        self.batch_sizes: list[int] = []
        """Sequences per decoded batch (most recent 10,000)."""

    def _init_worker(self) -> None:
        if self.cfg.cpu_threads:
            import torch

            torch.set_num_threads(self.cfg.cpu_threads)

    # -- public API ----------------------------------------------------------------------------------
    async def generate(self, request: ChatRequest, params: SamplingParams) -> list[Completion]:
        if self._closed:
            raise EngineError("engine is closed")
        ids = render_prompt_ids(self.tokenizer, request)
        if not ids:
            raise EngineError("empty prompt")
        check_prompt_fits(len(ids), self.max_model_len)
        fut = asyncio.get_running_loop().create_future()
        self._state().queue.put_nowait(_Item(ids, params, fut))
        self.counters["requests"] += 1
        return await fut

    def stats(self) -> dict[str, Any]:
        sizes = self.batch_sizes
        return {**self.counters, "mean_batch": (sum(sizes) / len(sizes)) if sizes else 0.0,
                "max_batch": max(sizes, default=0)}

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for st in self._states.values():
            if st.task is not None and not st.task.done():
                st.task.cancel()
        self._states.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- batching ------------------------------------------------------------------------------------
    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        for old in [lp for lp in self._states if lp.is_closed()]:
            del self._states[old]
        st = self._states.get(loop)
        if st is None or st.task is None or st.task.done():
            st = _LoopState(queue=asyncio.Queue()) if st is None else st
            st.task = loop.create_task(self._batcher(st), name="tf-engine-batcher")
            self._states[loop] = st
        return st

    async def _batcher(self, st: _LoopState) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not st.backlog:
                st.backlog.append(await st.queue.get())
                # give concurrently scheduled episodes the chance to enqueue before we cut the batch
                await asyncio.sleep(self.cfg.batch_wait_ms / 1000)
            while not st.queue.empty():
                st.backlog.append(st.queue.get_nowait())
            batch = self._take_batch(st.backlog)
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as e:  # a failing batch fails its requests, not the batcher
                log.warning("transformers batch of %d failed: %s", len(batch), e)
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(EngineError(f"generation failed: {type(e).__name__}: {e}"))
                continue
            finally:
                self.counters["busy_s"] += time.perf_counter() - t0
            for it, res in zip(batch, results, strict=True):
                if not it.future.done():
                    it.future.set_result(res)

    def _take_batch(self, backlog: deque) -> list[_Item]:
        """Oldest request's params decide the batch; take every waiting request with the same params."""
        while backlog and backlog[0].future.done():  # cancelled callers
            backlog.popleft()
        if not backlog:
            return []
        key = _key(backlog[0].params)
        batch, rest, rows = [], deque(), 0
        for it in backlog:
            if it.future.done():
                continue
            if _key(it.params) == key and (not batch or rows + it.params.n <= self.cfg.max_batch_size):
                batch.append(it)
                rows += it.params.n
            else:
                rest.append(it)
        backlog.clear()
        backlog.extend(rest)
        return batch

    # -- the decode (worker thread) ------------------------------------------------------------------
    def _stopping(self, stops: tuple[str, ...]) -> Any:
        from transformers import StoppingCriteriaList, StopStringCriteria

        if stops not in self._stop_criteria:
            self._stop_criteria[stops] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stops))])
        return self._stop_criteria[stops]

    def _run_batch(self, batch: list[_Item]) -> list[list[Completion]]:
        import torch

        p = batch[0].params
        sample = not p.greedy
        # greedy n>1: transformers refuses num_return_sequences without sampling; repeat the rows instead
        reps = 1 if sample else p.n
        prompts = [it.ids for it in batch for _ in range(reps)]
        width = max(len(x) for x in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, ids in enumerate(prompts):
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[r, width - len(ids):] = 1
        max_new = max(1, min(p.max_tokens, self.max_model_len - width))
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new, do_sample=sample, pad_token_id=self.pad_id,
                                      eos_token_id=self.eos_ids or None, return_dict_in_generate=True,
                                      output_logits=p.logprobs)
        if sample:
            kwargs.update(temperature=p.temperature, top_p=p.top_p, top_k=0, num_return_sequences=p.n)
        if p.stop:
            kwargs["stopping_criteria"] = self._stopping(p.stop)
        if p.ignore_eos:
            kwargs["min_new_tokens"] = max_new
        if p.seed is not None:
            torch.manual_seed(p.seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        gen = out.sequences[:, width:]
        rows = gen.shape[0]
        logprob_rows = None
        if p.logprobs:
            logprob_rows = torch.zeros((rows, gen.shape[1]), dtype=torch.float32)
            for t, lg in enumerate(out.logits):
                lp = torch.log_softmax(lg.float(), dim=-1)
                logprob_rows[:, t] = lp.gather(1, gen[:, t: t + 1]).squeeze(1)
        self.counters["batches"] += 1
        self.counters["sequences"] += rows
        self.batch_sizes.append(rows)
        if len(self.batch_sizes) > 10_000:
            del self.batch_sizes[:5_000]
        results: list[list[Completion]] = []
        for i, it in enumerate(batch):
            comps = []
            for j in range(p.n):
                r = i * p.n + j
                comps.append(self._finish(gen[r].tolist(), len(it.ids), p, max_new,
                                          None if logprob_rows is None else logprob_rows[r]))
            self.counters["prompt_tokens"] += len(it.ids)
            results.append(comps)
        return results

    def _finish(self, ids: list[int], prompt_len: int, p: SamplingParams, max_new: int, lps: Any) -> Completion:
        eos_at = None
        if not p.ignore_eos:
            for k, t in enumerate(ids):
                if t in self.eos_ids:
                    eos_at = k
                    break
        if eos_at is not None:
            ids = ids[: eos_at + 1]
            body = ids[:-1]
        else:
            body = ids
        decode = lambda x: self.tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
        text = decode(body)
        finish, stop_reason = ("stop" if eos_at is not None else "length"), None
        if p.stop:
            cut, stop_reason = truncate_at_stop(text, p.stop)
            if stop_reason is not None:
                # shortest token prefix whose text holds the stop string: where generation really ended
                lo, hi = 1, len(body)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if truncate_at_stop(decode(body[:mid]), p.stop)[1] is not None:
                        hi = mid
                    else:
                        lo = mid + 1
                ids = body[:lo]
                text, finish = cut, "stop"
        per = [float(x) for x in lps[: len(ids)]] if lps is not None else None
        cum = float(sum(per)) if per is not None else None
        self.counters["generated_tokens"] += len(ids)
        return Completion(text=text, token_ids=list(ids), prompt_tokens=prompt_len, completion_tokens=len(ids),
                          finish_reason=finish, stop_reason=stop_reason, cumulative_logprob=cum,
                          token_logprobs=per)
