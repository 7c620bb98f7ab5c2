"""Prompt texts: the teacher's long system prompt, the student's short one, the task turn, CoT prompts.

Structure follows METHOD.md §1-2 (format rules, tool list with signatures, authorized imports, few-shot
Thought/Code/Observation examples for the teacher; intro + tool list for the student); the wording is ours.
The student prompt is part of the trained model's interface: changing it changes what SFT data and serving
send, so `STUDENT_PROMPT_VERSION` is bumped with every edit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

Role = Literal["teacher", "student"]

STUDENT_PROMPT_VERSION = "1"

AUTHORIZED_IMPORTS = (
    "collections", "datetime", "itertools", "math", "queue", "random", "re", "stat", "statistics", "time",
    "unicodedata", "numpy", "sympy",
)

KNOWN_TOOLS: dict[str, tuple[str, str]] = {
    "web_search": (
        "web_search(query: str) -> str",
        "Semantic search over a Wikipedia corpus. Returns the 3 most relevant passages as text, each "
        "introduced by a line `===== Document i, similarity: 0.xx =====`. Ask about one thing at a time.",
    ),
    "final_answer": (
        "final_answer(answer: any) -> None",
        "Submit the answer to the task. This ends the task, so call it only once you are sure.",
    ),
}


def tool_doc(name: str, fn: Callable | None = None) -> tuple[str, str]:
    """(signature, description) of a tool: known tools have fixed texts; others come from the callable."""
    if name in KNOWN_TOOLS:
        return KNOWN_TOOLS[name]
    sig = f"{name}(...)"
    doc = "(no description)"
    if fn is not None:
        try:
            sig = f"{name}{inspect.signature(fn)}"
        except (TypeError, ValueError):
            pass
        doc = (inspect.getdoc(fn) or doc).strip().splitlines()[0]
    return sig, doc


def tool_list(tools: Iterable[str] | Mapping[str, Callable]) -> str:
    names = list(tools.keys()) if isinstance(tools, Mapping) else list(tools)
    fns = tools if isinstance(tools, Mapping) else {}
    names = [n for n in names if n != "final_answer"] + ["final_answer"]
    lines = []
    for n in names:
        sig, doc = tool_doc(n, fns.get(n))
        lines.append(f"- {sig}\n    {doc}")
    return "\n".join(lines)


_TEACHER_INTRO = """You are an expert problem solver who works by writing and running Python code.
You solve the task in a loop of steps. In each step you write:
1. `Thought:` a short explanation of what you know so far and what you will do next;
2. one Python code block, opened with ```py and closed with ``` followed directly by <end_code>.
The code is executed, and everything it prints is shown back to you in the next message as
`Observation:`. Use print() to see intermediate results - values that you do not print are not shown
(except the value of the last line).

Rules:
- Always write both a `Thought:` and a code block ending in ```<end_code>; a step without code fails.
- The interpreter is persistent: variables, imports and functions defined in earlier steps stay available.
- Only call a tool with the arguments its signature allows. Do not chain many tool calls whose output
  you cannot predict in one block: print the results and decide in the next step.
- Do not give a variable the name of a tool (e.g. do not assign to `final_answer`).
- You may import only these modules (and their submodules): {imports}.
- When you know the answer, call `final_answer(...)` in a code block. For math, pass the exact value as
  a LaTeX string in \\boxed{{}}, e.g. final_answer("\\\\boxed{{\\\\frac{{3}}{{4}}}}"); for factual questions,
  pass a short answer (a name, a date, a number), not a sentence.
- Never give up: if something fails, read the error and try another way.

These functions are available in the interpreter:
{tools}
"""

_TEACHER_EXAMPLES_SEARCH = """
Example 1
---
Task: "Which river flows through the city where the composer of 'The Moldau' was born?"

Thought: I need the composer of 'The Moldau' and then his birthplace. I will search for the composer first.
```py
print(web_search(query="composer of The Moldau"))
```<end_code>
Observation:
Execution logs:
===== Document 1, similarity: 0.86 =====
"Vltava" ... the symphonic poem "The Moldau" by Bedrich Smetana ...
Last output from code snippet:
None

Thought: The composer is Bedrich Smetana. Now I search for where he was born.
```py
print(web_search(query="Bedrich Smetana birthplace"))
```<end_code>
Observation:
Execution logs:
===== Document 1, similarity: 0.81 =====
"Bedrich Smetana" ... born in Litomysl, Bohemia ... the Loucna river runs through the town ...
Last output from code snippet:
None

Thought: Smetana was born in Litomysl, and the Loucna river flows through it.
```py
final_answer("Loucna")
```<end_code>
"""

_TEACHER_EXAMPLES_MATH = """
Example {k}
---
Task: "What is the sum of all positive integers n < 100 such that n^2 + 1 is divisible by 5?"

Thought: n^2 + 1 is divisible by 5 exactly when n^2 = 4 (mod 5), i.e. n = 2 or 3 (mod 5). I will check by
brute force instead of relying on the residue argument alone.
```py
ns = [n for n in range(1, 100) if (n * n + 1) % 5 == 0]
print(len(ns), sum(ns))
```<end_code>
Observation:
Execution logs:
40 1980
Last output from code snippet:
None

Thought: There are 40 such numbers and their sum is 1980, which matches the residue argument.
```py
final_answer("\\\\boxed{{1980}}")
```<end_code>

Example {k2}
---
Task: "Solve x^2 - 5x + 6 = 0 and give the larger root."

Thought: I will solve the quadratic with sympy.
```py
import sympy as sp
x = sp.symbols("x")
roots = sp.solve(x**2 - 5 * x + 6, x)
print(roots)
```<end_code>
Observation:
Execution logs:
[2, 3]
Last output from code snippet:
None

Thought: The roots are 2 and 3; the larger one is 3.
```py
final_answer("\\\\boxed{{3}}")
```<end_code>
"""

_TEACHER_OUTRO = """
Now it is your turn. Solve the next task step by step in the same format.
"""

_STUDENT = """You are a problem solver who answers by writing Python code. Each step, write `Thought:` and then
one code block that starts with ```py and ends with ```<end_code>. Its printed output comes back as
`Observation:`. The interpreter keeps its state between steps. Allowed imports: {imports}.
Available functions:
{tools}
"""

TASK_INSTRUCTION = (
    "Always answer with a `Thought:` and a Python code block ending in ```<end_code>. "
    "If this is a math problem, give the final answer with final_answer() as an exact value in LaTeX "
    "\\boxed{}."
)


def system_prompt(role: Role, tools: Iterable[str] | Mapping[str, Callable] = ()) -> str:
    """The agent's system prompt for `role`, listing `tools` (final_answer is always listed)."""
    names = list(tools.keys()) if isinstance(tools, Mapping) else list(tools)
    listing = tool_list(tools)
    imports = ", ".join(AUTHORIZED_IMPORTS)
    if role == "student":
        return _STUDENT.format(imports=imports, tools=listing)
    if role != "teacher":
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    text = _TEACHER_INTRO.format(imports=imports, tools=listing)
    text += "\nHere are examples of the format (observations shortened)."
    k = 1
    if "web_search" in names:
        text += "\n" + _TEACHER_EXAMPLES_SEARCH
        k = 2
    text += _TEACHER_EXAMPLES_MATH.format(k=k, k2=k + 1)
    return text + _TEACHER_OUTRO


def task_prompt(question: str) -> str:
    """The first user turn of an agent episode."""
    return f"New task:\n{question}\n\n{TASK_INSTRUCTION}"


MAX_STEPS_PROMPT = (
    "You have used all the steps you were allowed. Based on the work above, state your final answer now. "
    "Reply with one line `Final answer: <answer>` (for math, the exact value in \\boxed{})."
)

COT_SYSTEM = "You are a helpful assistant who reasons carefully before answering."

COT_INSTRUCTION = (
    "Think step by step, then write the final answer inside <answer></answer>. For a math problem, write "
    "the exact value in LaTeX \\boxed{} inside the answer tags; for a factual question, a short answer."
)


def cot_prompt(question: str, passages: Iterable[str] | None = None) -> str:
    """The user turn of a chain-of-thought request; retrieved passages (RAG-CoT) go first when given."""
    parts = []
    if passages:
        docs = "\n".join(f"Document {i + 1}: {p.strip()}" for i, p in enumerate(passages))
        parts.append(f"Here are passages that may help:\n{docs}\n")
    parts.append(f"Question: {question}\n\n{COT_INSTRUCTION}")
    return "\n".join(parts)
