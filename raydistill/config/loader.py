"""YAML + `key.sub=value` overrides -> validated RootConfig, with errors that name the bad key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

OVERRIDE_RE = re.compile(r"^[A-Za-z_][\w.]*=")


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what is allowed."""


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split argv into (overrides, positionals): an item is an override iff it matches `^[A-Za-z_][\\w.]*=`."""
    overrides = [a for a in argv if OVERRIDE_RE.match(a)]
    positionals = [a for a in argv if not OVERRIDE_RE.match(a)]
    return overrides, positionals


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, override: str) -> None:
    key, _, raw = override.partition("=")
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = _parse_value(raw)


def _describe(model_cls: type[BaseModel], loc: tuple) -> str:
    """Allowed keys at the parent of `loc`, for 'extra fields not permitted' errors."""
    cls: Any = model_cls
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            return ""
    if cls is not None and hasattr(cls, "model_fields"):
        return "allowed keys: " + ", ".join(sorted(cls.model_fields))
    return ""


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; {_describe(model_cls, loc)}"
        elif "literal_error" in e["type"] or e["type"] == "enum":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_tree(path: str | Path | None, overrides: list[str] = ()) -> dict:
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = loaded
    for o in overrides:
        if not OVERRIDE_RE.match(o):
            raise ConfigError(f"not an override (expected key.sub=value): {o!r}")
        apply_override(tree, o)
    return tree
