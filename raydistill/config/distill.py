"""The whole-workflow job (`raydistill distill`): which stages run, the CoT branch, deployment, config changes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from raydistill.config.base import Section

StageName = Literal["index", "generate", "train", "evaluate"]
PIPELINE: tuple[str, ...] = ("index", "generate", "train", "evaluate")


class DistillConfig(Section):
    stages: list[StageName] = Field(default_factory=lambda: list(PIPELINE))
    """Stages this job may run, always in pipeline order; a stage left out must already be done (or is not
    needed: `index` when retrieval is off or `retrieval.index_dir` names a prebuilt index)."""
    cot_branch: bool | None = None
    """The CoT-distillation baseline beside the agent branch. None: as `generate.kinds`/`train.kinds`/
    `evaluate.modes` say. True: add `cot` to all three. False: drop `cot` (and `rag_cot`) from all three."""
    deploy: bool = False
    """After evaluate, deploy the student (agent adapter) as the Ray Serve app and leave it running.
    Only useful against a running cluster: a local Ray started by the job ends with it."""
    on_config_change: Literal["error", "rerun"] = "error"
    """A stage finished (or started) in this run_dir under a different config. `error`: stop and name the
    changed keys. `rerun`: move its outputs (and everything downstream) aside to `*.stale-<time>` and redo."""

    @field_validator("stages")
    @classmethod
    def _ordered_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"stages listed twice: {v}")
        return [s for s in PIPELINE if s in v]
