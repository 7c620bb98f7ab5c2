"""Prompt rendering and stop-string handling shared by the backends that own a tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from raydistill.engines.base import ChatRequest


def render_prompt_text(tokenizer: Any, request: ChatRequest) -> str:
    """The chat-templated prompt text; an unfinished final assistant turn is left open, spacing intact."""
    assert request.messages is not None
    cont = request.continue_final_message
    text = tokenizer.apply_chat_template(
        request.messages, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
    )
    if cont:
        # Some template/transformers combinations trim the trailing whitespace of the continued message;
        # the model must see exactly what will be stored, so put it back.
        final = request.messages[-1]["content"]
        stripped = final.rstrip()
        if final != stripped and not text.endswith(final) and text.endswith(stripped):
            text += final[len(stripped):]
    return text


def render_prompt_ids(tokenizer: Any, request: ChatRequest) -> list[int]:
    """Token ids of the prompt (raw ids pass through)."""
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids)
    text = render_prompt_text(tokenizer, request)
    return list(tokenizer.encode(text, add_special_tokens=False))


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Cut `text` at the earliest stop string (excluded); returns (text, the stop string or None)."""
    best: tuple[int, str] | None = None
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return text, None
    return text[: best[0]], best[1]
