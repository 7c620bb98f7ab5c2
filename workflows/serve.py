"""Serve the distilled student agent over HTTP (Ray Serve): /v1/solve, /v1/chat/completions, /docs.

    python workflows/serve.py --config configs/local.yaml [key.sub=value ...]

Same as `raydistill serve`.
"""

import sys
from pathlib import Path

# Run from a checkout (or a job's uploaded working dir) without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
