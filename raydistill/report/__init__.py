"""Evaluation report: result rows (Parquet) -> report.md, report.html, plots and example trajectories.

    rows = read_results(run_dir / "eval" / "results")
    write_report(rows, run_dir / "eval")
"""

from raydistill.report.render import write_example, write_report
from raydistill.report.results import (
    RESULT_SCHEMA,
    done_keys,
    failure_reason,
    read_results,
    result_row,
    to_table,
)

__all__ = [
    "RESULT_SCHEMA", "done_keys", "failure_reason", "read_results", "result_row", "to_table", "write_example",
    "write_report",
]
