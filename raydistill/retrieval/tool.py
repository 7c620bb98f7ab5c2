"""The agent's `web_search(query: str) -> str` tool (METHOD.md §1): top-k passages as text.

Format: a header line, then per passage `===== Document i, similarity: 0.xx =====` and its contents. The
numbering starts at 0 and the header reads "Retrieved documents:", as in the reference's retriever tool that
trained students have seen. The callable runs in the HOST process (the sandbox forwards the call; it has no
network or index of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from raydistill.retrieval.search import Hit, Retriever

HEADER = "Retrieved documents:"
NO_RESULTS = "No documents found for this query."


def format_web_search(query: str, hits: Sequence[Hit]) -> str:
    """Render hits for the model. `query` is accepted for symmetry with the tool call (not echoed)."""
    if not hits:
        return f"{HEADER}\n{NO_RESULTS}"
    parts = [HEADER]
    for i, h in enumerate(hits):
        parts.append(f"\n===== Document {i}, similarity: {h.score:.2f} =====\n{h.contents}")
    return "\n".join(parts)


def check_query(query: object) -> str:
    """The model calls the tool with whatever it wrote; a wrong type gets an error it can read and fix."""
    if not isinstance(query, str):
        raise TypeError(f"web_search(query) needs a string query, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("web_search(query) got an empty query; pass the words to search for")
    return query


def make_web_search(retriever: Retriever, k: int = 3) -> Callable[[str], str]:
    """A synchronous `web_search(query) -> str` over an in-process retriever (tests, single-process use)."""

    def web_search(query: str) -> str:
        """Semantic search over the Wikipedia corpus; returns the top passages as text."""
        q = check_query(query)
        return format_web_search(q, retriever.search([q], k)[0])

    return web_search
