"""Curation of teacher trajectories: the shard store (resumable generation), grading, filtering, reports.

No Ray here; the generate stage and the teacher actors call into it.
"""

from raydistill.curation.filter import (
    REASONS,
    FilterResult,
    apply_filter,
    build_report,
    grade_trajectory,
    rejection_reasons,
)
from raydistill.curation.store import ShardError, TrajectoryStore, read_table, write_table

__all__ = [
    "REASONS",
    "FilterResult",
    "ShardError",
    "TrajectoryStore",
    "apply_filter",
    "build_report",
    "grade_trajectory",
    "read_table",
    "rejection_reasons",
    "write_table",
]
