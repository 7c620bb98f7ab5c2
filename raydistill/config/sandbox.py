"""Placeholder until the sandbox section lands."""

from raydistill.config.base import Section


class SandboxConfig(Section):
    pass
