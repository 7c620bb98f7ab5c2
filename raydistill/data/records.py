"""The common question record every stage reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Domain = Literal["math", "qa"]


@dataclass(frozen=True)
class Record:
    id: str
    """`<set>/<original id>`: original ids are mixed int/str and collide across sets."""
    question: str
    answer: str | list[str]
    """Gold answer; a list holds aliases (any one counts)."""
    domain: Domain
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


class DataError(ValueError):
    """A data file or row is malformed; the message names the file and row."""
