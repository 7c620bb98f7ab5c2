"""Student LoRA training, without Ray: SFT data checks, packing, the per-worker loop, plots, export.

The Ray Train stage (`raydistill.stages.train`) runs `loop.run` on every worker through a `Runtime`.
"""

from raydistill.train.data import (
           SftDataError,
           SftMeta,
           chat_template_sha256,
           check_dataset_dir,
           check_tokenizer,
)
from raydistill.train.loop import LocalRuntime, LoopSettings, Plan, make_plan, run
from raydistill.train.packing import MicroBatch, Sample, pack, plan_micro_batches

__all__ = ["LocalRuntime", "LoopSettings", "MicroBatch", "Plan", "Sample", "SftDataError", "SftMeta",
           "chat_template_sha256", "check_dataset_dir", "check_tokenizer", "make_plan", "pack",
           "plan_micro_batches", "run"]
