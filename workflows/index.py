"""Build the retrieval index: embed the corpus on a Ray Data actor pool, write shards, build the faiss index.

    python workflows/index.py --config configs/local.yaml [key.sub=value ...] [--force] [--serve --port 8001]

Same as `raydistill index`. Resumable: a rerun embeds only missing shards (see docs/retrieval.md).
"""

import sys
from pathlib import Path

# Run from a checkout (or a job's uploaded working dir) without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
