"""raydistill: agent distillation on Ray (teacher trajectories, LoRA students, sandboxed tools, serving)."""

__version__ = "0.1.0"
