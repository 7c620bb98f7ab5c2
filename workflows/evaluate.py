"""Evaluate the students on the test sets (Ray Data) and write <run_dir>/eval/report.md + report.html.

    python workflows/evaluate.py --config configs/local.yaml [key.sub=value ...]

Same as `raydistill evaluate`.
"""

import sys
from pathlib import Path

# Run from a checkout (or a job's uploaded working dir) without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
