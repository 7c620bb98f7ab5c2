"""Parsing model text into actions, `<end_code>` normalisation, observation formatting and truncation."""

from __future__ import annotations

import pytest

from raydistill.agent import parsing
from raydistill.agent.parsing import normalize_end_code, parse_action


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Thought: x\n```py\nprint(1)\n```", "Thought: x\n```py\nprint(1)\n```<end_code>"),
        ("Thought: x\n```py\nprint(1)\n```\n\n  ", "Thought: x\n```py\nprint(1)\n```<end_code>"),
        ("Thought: x\n```py\nprint(1)\n```<end_code>", "Thought: x\n```py\nprint(1)\n```<end_code>"),
        ("Thought: x\n```py\nprint(1)\n```  <end_code>\n", "Thought: x\n```py\nprint(1)\n```<end_code>"),
        # an opening fence at the end is not a finished block: leave it
        ("Thought: x\n```", "Thought: x\n```"),
        ("Thought: only words", "Thought: only words"),
    ],
)
def test_normalize_end_code(text, expected):
    assert normalize_end_code(text) == expected


def test_parse_plain_block():
    a = parse_action("Thought: add them\n```py\nx = 1 + 2\nprint(x)\n```<end_code>")
    assert a.ok and a.thought == "add them" and a.code == "x = 1 + 2\nprint(x)"


@pytest.mark.parametrize("lang", ["py", "python", "Python", ""])
def test_parse_fence_languages(lang):
    a = parse_action(f"Thought: t\n```{lang}\ny = 2\n```<end_code>")
    assert a.ok and a.code == "y = 2"


def test_several_blocks_are_joined_in_order():
    a = parse_action("Thought: two\n```py\na = 1\n```\nthen\n```python\nb = a + 1\nprint(b)\n```<end_code>")
    assert a.ok and a.code == "a = 1\n\nb = a + 1\nprint(b)"


def test_no_fence_whole_text_as_python():
    a = parse_action("x = 3\nprint(x * 2)")
    assert a.ok and a.code == "x = 3\nprint(x * 2)"


def test_no_fence_prose_is_a_parse_error():
    a = parse_action("Thought: I think the answer is Paris.")
    assert not a.ok and "No Python code block" in a.parse_error
    assert a.thought == "I think the answer is Paris."


def test_single_word_is_not_code():
    assert not parse_action("Paris").ok


def test_unclosed_fence_is_a_parse_error():
    a = parse_action("Thought: t\n```py\nx = 1\nprint(x")
    assert not a.ok and "not closed" in a.parse_error


def test_empty_block_is_a_parse_error():
    a = parse_action("Thought: t\n```py\n\n```<end_code>")
    assert not a.ok and "empty" in a.parse_error


def test_syntax_error_is_a_parse_error_with_the_message():
    a = parse_action("Thought: t\n```py\ndef f(:\n    pass\n```<end_code>")
    assert not a.ok and a.code is not None and "SyntaxError" in a.parse_error and "line 1" in a.parse_error


def test_thought_without_prefix_and_end_code_inside():
    a = parse_action("I will compute.\n```py\nprint('<end_code>' if False else 5)\n```<end_code>")
    assert a.ok and a.thought == "I will compute." and "print(" in a.code


def test_truncate_middle_keeps_head_and_tail():
    text = "H" * 500 + "M" * 1000 + "T" * 500
    out = parsing.truncate_middle(text, 200)
    assert out.startswith("H" * 100) and out.endswith("T" * 100)
    assert "1800 characters cut" in out and "M" not in out
    assert parsing.truncate_middle("short", 200) == "short"


def test_observation_formats():
    ok = parsing.format_observation("42\n", "'x'", 1000)
    assert ok == "Observation:\nExecution logs:\n42\n\nLast output from code snippet:\n'x'"
    assert parsing.format_observation("", None, 1000).endswith("Last output from code snippet:\nNone")
    err = parsing.format_error("NameError: name 'y' is not defined", 1000, stdout="partial\n")
    assert err.startswith("Observation:\nExecution logs:\npartial\n\nError:\nNameError")
    assert "Now let's retry" in err
    long = parsing.format_observation("z" * 5000, None, 300)
    assert len(long) < 600 and "characters cut" in long


@pytest.mark.parametrize(
    "text, answer",
    [
        ("reasoning...\n<answer>Paris</answer>", "Paris"),
        ("<answer>1</answer> then <answer>\\boxed{2}</answer>", "\\boxed{2}"),
        ("so the result is \\boxed{\\frac{1}{2}} done", "\\boxed{\\frac{1}{2}}"),
        ("no answer here", None),
    ],
)
def test_extract_cot_answer(text, answer):
    assert parsing.extract_cot_answer(text) == answer


def test_extract_free_answer():
    assert parsing.extract_free_answer("blah\nFinal answer: 12") == "12"
    assert parsing.extract_free_answer("it is \\boxed{7}.") == "\\boxed{7}"
    assert parsing.extract_free_answer("one\nlast line") == "last line"
    assert parsing.extract_free_answer("  ") is None


def test_first_paragraph():
    assert parsing.first_paragraph("Thought: First idea here.\nstill first.\n\nSecond para.") == \
        "First idea here.\nstill first."
    assert parsing.first_paragraph("\n\n  Only one.  ") == "Only one."
    assert parsing.first_paragraph("") == ""
