"""`python -m raydistill` == the `raydistill` console script (GPU hosts run from PYTHONPATH)."""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main())
