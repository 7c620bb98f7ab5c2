"""Validated config tree: `load_config(path, overrides)` -> RootConfig."""

from raydistill.config.loader import ConfigError, split_overrides
from raydistill.config.root import RootConfig, load_config

__all__ = ["ConfigError", "RootConfig", "load_config", "split_overrides"]
