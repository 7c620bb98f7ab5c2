"""The whole workflow as one Ray job: index -> generate -> train -> evaluate (-> deploy), resumable.

    python workflows/distill.py --config configs/local.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python workflows/distill.py --config CONFIG run_dir=/shared/runs/x

Same as `raydistill distill`. Under `ray job submit` the working dir is uploaded without what `.gitignore` and
`.rayignore` exclude (.venv, runs/, .git, ...); give `run_dir` an absolute path on storage every node sees
(the job's working dir is temporary). Config `ray.address: local` joins the cluster the job runs on.
"""

import sys
from pathlib import Path

# Run from a checkout (or a job's uploaded working dir) without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
