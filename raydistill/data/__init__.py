"""Bundled benchmark sets and corpus sample, and loaders into the common Record."""

from raydistill.data.loaders import (
    LoadResult,
    bundled_sets,
    corpus_path,
    load_file,
    load_set,
    load_sets,
    resolve_set,
    set_name,
)
from raydistill.data.records import DataError, Record

__all__ = [
    "DataError", "LoadResult", "Record", "bundled_sets", "corpus_path", "load_file", "load_set",
    "load_sets", "resolve_set", "set_name",
]
