"""Teacher trajectory generation, grading and filtering (METHOD.md §2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydistill.config.base import Section


class GenerateConfig(Section):
    kinds: list[Literal["agent", "cot"]] = ["agent"]
    """`agent`: code-acting trajectories; `cot`: the CoT-distillation baseline (plain reasoning)."""
    samples_per_question: int = Field(1, ge=1)
    """Trajectories per question (k). k = 1 is greedy (the paper); k > 1 samples at `sample_temperature`."""
    sample_temperature: float = Field(0.7, ge=0)
    """Temperature used when samples_per_question > 1 (greedy otherwise)."""
    cot_max_new_tokens: int | None = Field(None, ge=1)
    """Token budget of one CoT answer (kind `cot`); None: `agent.max_new_tokens`."""
    max_correct_per_question: int = Field(1, ge=1)
    """At most this many passing trajectories of one question go to SFT (lowest sample indices first)."""
    num_workers: int = Field(1, ge=1)
    """Teacher actors (each holds one engine; GPUs per actor from `teacher.num_gpus`)."""
    episodes_per_worker: int = Field(64, ge=1)
    """Concurrent episodes per teacher actor (the engine batches them)."""
    batch_size: int = Field(64, ge=1)
    """Questions per Ray Data batch (one map task). Several batches run on one actor at once so the engine
    stays full while a batch's slowest episodes finish."""
    shard_rows: int = Field(256, ge=1)
    """A worker writes its finished episodes to a new Parquet shard when this many are pending ..."""
    flush_interval_s: float = Field(30.0, ge=0)
    """... or when the oldest pending one has waited this long (0: every episode at once). Bounds the work a
    dying actor can lose."""
    worker_num_cpus: float | None = Field(None, ge=0)
    """CPUs per teacher actor; default `teacher.num_cpus` (fractional is fine: the work is async I/O)."""
    progress_interval_s: float = Field(10.0, gt=0)
    keep_all_for_smoke: bool = False
    """Keep every trajectory in the SFT data even if it fails the filter (smoke runs with random models only).
    The filter report still records the real verdicts."""
    on_config_change: Literal["error", "rerun"] = "error"
    """Trajectories in run_dir were made under other generation settings. `error`: stop and name the changed
    keys. `rerun`: move the old outputs aside (`*.stale-<time>`) and start over."""
