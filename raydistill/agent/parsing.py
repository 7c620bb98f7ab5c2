"""Turning model text into an action, and execution results into the observation the model sees next.

Format (METHOD.md §1): `Thought: ...` then a fenced Python block closed by ```<end_code>. Stored step text
always ends in ```<end_code>; code comes from fenced blocks (py/python/bare, several joined), else the
whole text is tried as Python. Code that does not parse as Python is a parse error (a failed step whose
error is shown to the model), so execution errors are only those raised while running.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

END_CODE = "<end_code>"
FENCE = "```"

_BLOCK_RE = re.compile(r"```[ \t]*(?:py|python|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_THOUGHT_RE = re.compile(r"^\s*Thought\s*:\s*", re.IGNORECASE)

FORMAT_HELP = (
    "Your reply must contain a `Thought:` and then a Python code block, like this:\n"
    "Thought: your reasoning\n```py\n# your code\n```<end_code>\n"
    "Make sure to follow this format exactly."
)
RETRY_HINT = (
    "Now let's retry: take care not to repeat previous errors! If the same approach failed several "
    "times, try a completely different one."
)


@dataclass
class Action:
    """What one assistant step asks for."""

    thought: str
    code: str | None
    parse_error: str | None = None
    """Why no runnable code was found (None = parsed)."""

    @property
    def ok(self) -> bool:
        return self.parse_error is None and self.code is not None


def normalize_end_code(text: str, stop_reason: str | int | None = None) -> str:
    """Make a step end in ```<end_code> when it ends a code block (the stop string is cut by engines).

    Text that does not end with a closing fence is returned with only trailing whitespace removed.
    """
    t = text.rstrip()
    if t.endswith(END_CODE):
        head = t[: -len(END_CODE)].rstrip()
        return head + END_CODE if head.endswith(FENCE) else t
    if t.endswith(FENCE) and _ends_a_block(t):
        return t + END_CODE
    return t


def _ends_a_block(t: str) -> bool:
    """The final ``` closes a block (an even number of fences), rather than opening one."""
    return t.count(FENCE) % 2 == 0


def strip_end_code(text: str) -> str:
    return text.replace(END_CODE, "")


def parse_action(text: str) -> Action:
    """Extract thought and code. Never raises: failures come back as `Action.parse_error`."""
    body = strip_end_code(text)
    blocks = [b.strip("\n") for b in _BLOCK_RE.findall(body)]
    blocks = [b for b in blocks if b.strip()]
    first_fence = body.find(FENCE)
    thought_part = body if first_fence < 0 else body[:first_fence]
    thought = _THOUGHT_RE.sub("", thought_part, count=1).strip()
    if blocks:
        code = "\n\n".join(blocks)
    elif first_fence >= 0:
        # A fence that never closed (e.g. cut off by max_tokens) or an empty block.
        tail = body[first_fence + len(FENCE):]
        tail = re.sub(r"^[ \t]*(?:py|python|python3)?[ \t]*\n", "", tail, flags=re.IGNORECASE)
        if tail.strip() and FENCE not in tail:
            return Action(thought, None, "The code block was not closed with ```. " + FORMAT_HELP)
        return Action(thought, None, "The code block is empty. " + FORMAT_HELP)
    else:
        # No fence at all: try the whole text (minus a leading `Thought:` line) as Python.
        candidate = _THOUGHT_RE.sub("", body, count=1).strip()
        if not candidate or not _is_python(candidate):
            return Action(thought, None, "No Python code block was found in your reply. " + FORMAT_HELP)
        return Action("", candidate)
    err = syntax_error(code)
    if err:
        return Action(thought, code, f"The code could not be parsed as Python: {err}")
    return Action(thought, code)


def syntax_error(code: str) -> str | None:
    try:
        ast.parse(code)
    except SyntaxError as e:
        line = f" (line {e.lineno})" if e.lineno else ""
        return f"{type(e).__name__}: {e.msg}{line}"
    except (ValueError, MemoryError, RecursionError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _is_python(text: str) -> bool:
    """Whole-text fallback: accept only code that parses and is more than a bare name/word."""
    if syntax_error(text) is not None:
        return False
    tree = ast.parse(text)
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Name | ast.Constant)) for n in tree.body)


def truncate_middle(text: str, max_chars: int) -> str:
    """Keep the head and the tail of `text` within `max_chars` (plus a one-line notice)."""
    if len(text) <= max_chars:
        return text
    keep = max(max_chars, 2)
    head = text[: keep // 2]
    tail = text[len(text) - (keep - keep // 2):]
    cut = len(text) - len(head) - len(tail)
    return f"{head}\n[... {cut} characters cut to keep this output under {max_chars} characters ...]\n{tail}"


def format_observation(stdout: str, value: Any, max_chars: int) -> str:
    """The user turn after a successful step."""
    logs = truncate_middle(stdout or "", max_chars)
    val = truncate_middle("None" if value is None else str(value), max_chars)
    return f"Observation:\nExecution logs:\n{logs}\nLast output from code snippet:\n{val}"


def format_error(message: str, max_chars: int, stdout: str = "") -> str:
    """The user turn after a failed step (parse or execution error); printed output before it is kept."""
    msg = truncate_middle(message.strip() or "unknown error", max_chars)
    logs = f"Execution logs:\n{truncate_middle(stdout, max_chars)}\n" if stdout else ""
    return f"Observation:\n{logs}Error:\n{msg}\n{RETRY_HINT}"


_FINAL_LINE_RE = re.compile(r"final answer\s*[:：]\s*(.+)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\boxed\s*\{")


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` with balanced braces, as written (None if absent)."""
    starts = [m.start() for m in _BOXED_RE.finditer(text)]
    for s in reversed(starts):
        i = text.index("{", s)
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[s: j + 1]
    return None


def extract_free_answer(text: str) -> str | None:
    """Answer from free text (the max-steps fallback reply): `Final answer: ...` line, else last \\boxed{}."""
    t = strip_end_code(text).strip()
    matches = list(_FINAL_LINE_RE.finditer(t))
    if matches:
        m = matches[-1]
        return m.group(1).strip().strip("`").strip() or None
    boxed = last_boxed(t)
    if boxed:
        return boxed
    return t.splitlines()[-1].strip() if t else None


_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def extract_cot_answer(text: str) -> str | None:
    """CoT answer: the last <answer>...</answer>, else the last \\boxed{...}, else None."""
    tags = _ANSWER_TAG_RE.findall(text)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    return last_boxed(text)


def first_paragraph(text: str) -> str:
    """Text up to the first blank line (the ftp seed); a leading `Thought:` is dropped."""
    t = text.strip()
    t = _THOUGHT_RE.sub("", t, count=1)
    para = re.split(r"\n[ \t]*\n", t, maxsplit=1)[0]
    return para.strip()
