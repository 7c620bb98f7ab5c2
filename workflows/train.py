"""Student LoRA training on Ray Train, one run per SFT kind (<run_dir>/train/<kind>/adapter, metrics, curve).

    python workflows/train.py --config configs/local.yaml [key.sub=value ...] [--kind agent]
    ray job submit --working-dir . -- python workflows/train.py --config CONFIG run_dir=/shared/runs/x

Same as `raydistill train`. Run it again after a crash or stop: it resumes from the last checkpoint.
"""

import sys
from pathlib import Path

# Run from a checkout (or a job's uploaded working dir) without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
