"""Teacher trajectories on Ray Data, then grading + filtering, then SFT data (per kind: agent, cot).

    python workflows/generate.py --config configs/local.yaml [key.sub=value ...]

Same as `raydistill generate`. Resumable: rerun the same command after a crash or kill; finished
(question, sample) trajectories are kept and never redone or duplicated.
"""

import sys
from pathlib import Path

# Run from a checkout (or a job's uploaded working dir) without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
