"""Sandbox section: isolation level, per-interpreter limits, authorized imports, and the Ray actor pool.

Defaults are the safe ones: strongest isolation available (refusing to run below seccomp level unless
told), limits sized for agent snippets (seconds of CPU, a couple of GiB of address space, a few dozen
processes), and METHOD.md's authorized imports.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raydistill.config.base import Section

METHOD_IMPORTS = ["collections", "datetime", "itertools", "math", "queue", "random", "re", "stat", "statistics",
                  "time", "unicodedata", "numpy", "sympy"]
LEVELS = ("rlimits", "seccomp", "bwrap")


class SandboxLimits(Section):
    """Per-interpreter limits (each forked interpreter gets the same)."""

    step_timeout_s: float = Field(30.0, gt=0)
    """Wall-clock budget of one `run` (time spent inside tool calls is not counted). At the budget the code
    is interrupted in-process (a TimeoutError the model sees); `kill_grace_s` later the host kills it."""
    kill_grace_s: float = Field(2.0, gt=0)
    tool_timeout_s: float = Field(120.0, gt=0)
    """Budget of one tool call made from sandboxed code (e.g. web_search)."""
    max_tool_calls_per_step: int = Field(100, ge=1)
    """More tool calls than this in one step stop the step (tool time is not step time, so without a cap a
    loop of calls would never time out)."""
    max_step_wall_s: float = Field(900.0, gt=0)
    """Hard wall-clock cap on one step including its tool calls."""
    cpu_s_per_step: float = Field(60.0, gt=0)
    """RLIMIT_CPU soft limit added per step (SIGXCPU -> TimeoutError in the code)."""
    cpu_s_total: int = Field(3600, ge=1)
    """RLIMIT_CPU hard limit over an interpreter's whole life (SIGKILL)."""
    memory_mb: int = Field(2048, ge=256)
    """RLIMIT_AS of each interpreter process (virtual; numpy+sympy need ~200 MiB)."""
    max_processes: int = Field(32, ge=4)
    """RLIMIT_NPROC for one sandbox family (a sandbox, its forks and their snapshots)."""
    max_file_mb: int = Field(16, ge=1)
    """RLIMIT_FSIZE: largest file the code may write."""
    tmp_size_mb: int = Field(64, ge=1)
    """Size of the private writable temp dir (a tmpfs per family under bubblewrap)."""
    tmp_inodes: int = Field(4096, ge=16)
    max_open_files: int = Field(128, ge=32)
    max_output_chars: int = Field(50_000, ge=100)
    """Printed output kept per step (head and tail), like the reference."""
    max_value_chars: int = Field(10_000, ge=100)
    """repr() of the last expression / the final answer, kept head and tail."""
    max_error_chars: int = Field(10_000, ge=100)
    max_code_chars: int = Field(1_000_000, ge=100)
    max_tool_arg_chars: int = Field(100_000, ge=100)
    max_tool_result_chars: int = Field(2_000_000, ge=100)


class SandboxPoolConfig(Section):
    """Ray actors hosting sandboxes (raydistill.actors.sandbox_pool)."""

    num_actors: int = Field(2, ge=1)
    num_cpus_per_actor: float = Field(0.25, ge=0)
    """Fractional is fine: actors mostly wait; the code they run is limited by the sandbox limits."""
    max_sandboxes_per_actor: int = Field(512, ge=1)
    """Live sandboxes (episodes and their forks) one actor holds before `create` waits."""
    idle_timeout_s: float = Field(3600.0, gt=0)
    """An actor closes sandboxes unused this long (handles that were dropped without aclose)."""


class SandboxConfig(Section):
    isolation: Literal["auto", "bwrap", "seccomp", "rlimits"] = "auto"
    """Requested isolation. auto: bubblewrap namespaces when they work, else seccomp+Landlock (logged as a
    loud warning). A named level is used exactly or fails."""
    min_isolation: Literal["bwrap", "seccomp", "rlimits"] = "seccomp"
    """Refuse to start below this level (rlimits only = no syscall or file filtering)."""
    authorized_imports: list[str] = Field(default_factory=lambda: list(METHOD_IMPORTS))
    """Top-level modules model code may import (with submodules); "*" allows all."""
    preload: list[str] = Field(default_factory=lambda: ["numpy", "sympy"])
    """Imported once in the zygote so every sandbox starts with them ready (fork, not import)."""
    on_error: Literal["keep", "rollback"] = "keep"
    """A step that raises: keep its partial effects (Jupyter semantics) or roll the state back to before it.
    Hard failures (timeout kill, crash) always roll back."""
    snapshots: bool = True
    """Recover state after a crash or kill, so it loses only the failed step: each sandbox keeps a forked copy
    (snapshot) of a committed state plus a journal of the steps since (code, tool results, outcome); a
    restore forks the snapshot and replays the journal."""
    replay_budget_s: float = Field(1.0, ge=0)
    """Steps are journaled instead of snapshotted until re-running them would take this long (their run time
    since the last snapshot, tool calls excluded: replay answers those from the journal); the step that gets
    there is snapshotted. A snapshot is a fork of the whole interpreter, most of a cheap step's cost; 0
    (and on_error="rollback", which needs the state before every step) snapshots after every step. A replay whose
    output differs from the original (time, randomness) is abandoned for the snapshot's older state, and the
    model is told which step that is. Files the code wrote are not rolled back either way."""
    warm_sandboxes: int = Field(2, ge=0)
    """Fresh sandboxes kept pre-started per configuration (refilled in the background), so `Sandbox()` is
    ready at once; they have run no code. 0 starts every sandbox on demand."""
    start_timeout_s: float = Field(60.0, gt=0)
    """Time allowed for the zygote (imports numpy/sympy once) and for each sandbox to come up."""
    zygote_tmp_mb: int = Field(16, ge=1)
    nice: int = Field(10, ge=0, le=19)
    """CPU niceness of every interpreter (set once in the zygote, inherited by each fork). Model code and the
    snapshot forks then yield the cores to the engine and the host loops that feed the GPU; a CPU-burning
    program cannot starve them. 0 keeps the host's priority."""
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    pool: SandboxPoolConfig = Field(default_factory=SandboxPoolConfig)

    @field_validator("authorized_imports", "preload")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if name != "*" and not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"not a module name: {name!r}")
        return v

    @model_validator(mode="after")
    def _rollback_needs_snapshots(self) -> SandboxConfig:
        if self.on_error == "rollback" and not self.snapshots:
            raise ValueError("on_error='rollback' needs snapshots=True (the pre-step state is the snapshot)")
        return self
