"""The one config tree every command reads."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError

from raydistill.config.agent import AgentConfig
from raydistill.config.base import Section
from raydistill.config.data import DataConfig
from raydistill.config.distill import DistillConfig
from raydistill.config.engine import EngineConfig
from raydistill.config.evaluate import EvaluateConfig
from raydistill.config.generate import GenerateConfig
from raydistill.config.loader import ConfigError, format_validation_error, load_tree
from raydistill.config.ray import RayConfig
from raydistill.config.retrieval import RetrievalConfig
from raydistill.config.sandbox import SandboxConfig
from raydistill.config.serve import ServeConfig
from raydistill.config.sft import SftConfig
from raydistill.config.train import TrainConfig


class RootConfig(Section):
    run_dir: str = "runs/default"
    seed: int = 0
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    teacher: EngineConfig = EngineConfig()
    student: EngineConfig = EngineConfig()
    agent: AgentConfig = AgentConfig()
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    retrieval: RetrievalConfig = RetrievalConfig()
    generate: GenerateConfig = GenerateConfig()
    sft: SftConfig = SftConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    distill: DistillConfig = DistillConfig()

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir).expanduser().resolve()


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RootConfig:
    """Load YAML (or defaults when path is None), apply `a.b=c` overrides, validate."""
    tree = load_tree(path, list(overrides))
    try:
        return RootConfig.model_validate(tree)
    except ValidationError as e:
        source = str(path) if path else "defaults"
        if overrides:
            source += " + overrides " + " ".join(overrides)
        raise ConfigError(format_validation_error(e, RootConfig, source)) from None
