"""Isolated, persistent, forkable Python interpreters for model-written code (see docs/sandbox.md).

    from raydistill.sandbox import Sandbox
    with Sandbox(tools={"web_search": fn}) as sb:
        r = sb.run("import math\\nmath.factorial(5)")   # r.value == "120"
"""

from raydistill.config.sandbox import SandboxConfig, SandboxLimits
from raydistill.sandbox.hub import SandboxError
from raydistill.sandbox.sandbox import Result, Sandbox, make_config

__all__ = ["Result", "Sandbox", "SandboxConfig", "SandboxError", "SandboxLimits", "make_config"]
