"""Trajectory shards on disk: many small Parquet files, each written atomically, keyed by (id, sample).

Why many files: a writer (a teacher actor, possibly on another node of a shared filesystem) never appends to
or rewrites a file, so a process killed at any moment leaves either a complete shard or a hidden temp file
that readers ignore. Resuming is then "read the keys of the shards that exist and skip them".
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.agent.trajectory import TRAJECTORY_SCHEMA, Trajectory, from_table, to_table

Key = tuple[str, int]
SHARD_GLOB = "part-*.parquet"
TMP_PREFIX = ".tmp-"


class ShardError(RuntimeError):
    """A shard file cannot be read; the message names the file."""


def _read(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ShardError(f"trajectory shard {path} is unreadable ({e}); delete it to regenerate its rows") from e


class TrajectoryStore:
    """A directory of trajectory shards. `keys()` rescans only files it has not seen yet (cheap to poll)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self._seen: dict[str, list[Key]] = {}

    def shards(self) -> list[Path]:
        """Finished shards, oldest first (names start with a nanosecond timestamp)."""
        if not self.dir.exists():
            return []
        return sorted(self.dir.glob(SHARD_GLOB))

    def keys(self) -> set[Key]:
        for p in self.shards():
            if p.name not in self._seen:
                t = _read(p, ["id", "sample"])
                self._seen[p.name] = list(zip(t.column("id").to_pylist(), t.column("sample").to_pylist(), strict=True))
        return {k for ks in self._seen.values() for k in ks}

    def write(self, trajs: Iterable[Trajectory], tag: str = "") -> Path | None:
        """Write one new shard atomically (temp file, fsync, rename). Returns its path (None if empty)."""
        trajs = list(trajs)
        if not trajs:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        safe_tag = "".join(c if c.isalnum() else "_" for c in tag)[:24]
        name = f"part-{time.time_ns():020d}-{safe_tag + '-' if safe_tag else ''}{uuid.uuid4().hex[:10]}.parquet"
        tmp = self.dir / f"{TMP_PREFIX}{name}"
        table = to_table(trajs)
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        self._seen[name] = [t.key for t in trajs]
        return self.dir / name

    def read(self, keys: set[Key] | None = None) -> tuple[list[Trajectory], int]:
        """All trajectories (restricted to `keys` when given), first copy of each key kept.

        Returns (trajectories sorted by key, number of duplicate rows dropped). Writers never produce
        duplicates in normal operation; the count is reported so a regression would be seen.
        """
        out: dict[Key, Trajectory] = {}
        dups = 0
        for p in self.shards():
            for t in from_table(_read(p)):
                if keys is not None and t.key not in keys:
                    continue
                if t.key in out:
                    dups += 1
                    continue
                out[t.key] = t
        return [out[k] for k in sorted(out)], dups

    def count_rows(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.shards())

    def clean_tmp(self, older_than_s: float = 0.0) -> int:
        """Remove temp files left by killed writers. Call when no writer is running on this directory."""
        if not self.dir.exists():
            return 0
        n = 0
        now = time.time()
        for p in self.dir.glob(f"{TMP_PREFIX}*"):
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n


def write_table(path: str | Path, trajs: list[Trajectory]) -> None:
    """One Parquet file of trajectories, written atomically (filter output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    pq.write_table(to_table(trajs) if trajs else TRAJECTORY_SCHEMA.empty_table(), tmp)
    os.replace(tmp, path)


def read_table(path: str | Path) -> list[Trajectory]:
    return from_table(_read(Path(path)))
