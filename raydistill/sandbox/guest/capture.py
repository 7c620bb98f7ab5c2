"""Bounded text capture: keeps the head and the tail of a stream so a print flood costs O(cap) memory."""

from __future__ import annotations

import collections
import io


def clean(s: str) -> str:
    """Valid UTF-8 only (lone surrogates would break JSON consumers and tokenizers downstream)."""
    return s.encode("utf-8", "replace").decode("utf-8")


def clip(s: str, cap: int) -> str:
    """Head and tail of `s` within about `cap` characters, with a marker saying what was cut."""
    if len(s) <= cap:
        return s
    head = cap // 2
    tail = cap - head
    return f"{s[:head]}\n... [{len(s) - cap} characters omitted] ...\n{s[-tail:] if tail else ''}"


class CappedText(io.TextIOBase):
    """A write-only text stream storing at most `cap` characters (first half + last half)."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = max(int(cap), 0)
        self._head_cap = self.cap // 2
        self._tail_cap = self.cap - self._head_cap
        self._head: list[str] = []
        self._head_len = 0
        self._tail: collections.deque[str] = collections.deque()
        self._tail_len = 0
        self.total = 0

    def writable(self) -> bool:
        return True

    def write(self, s) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        n = len(s)
        self.total += n
        if self._head_len < self._head_cap:
            take = s[: self._head_cap - self._head_len]
            self._head.append(take)
            self._head_len += len(take)
            s = s[len(take):]
        if s and self._tail_cap:
            if len(s) >= self._tail_cap:
                self._tail.clear()
                self._tail.append(s[-self._tail_cap:])
                self._tail_len = self._tail_cap
            else:
                self._tail.append(s)
                self._tail_len += len(s)
                while self._tail_len - len(self._tail[0]) >= self._tail_cap:
                    self._tail_len -= len(self._tail.popleft())
        return n

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def getvalue(self) -> str:
        head = "".join(self._head)
        tail = "".join(self._tail)
        if not self.truncated:
            return head + tail
        tail = tail[-self._tail_cap:] if self._tail_cap else ""
        return f"{head}\n... [{self.total - len(head) - len(tail)} characters omitted] ...\n{tail}"
