"""math_equal: extraction, fast paths, symbolic equivalence through the worker pool, tolerance rules."""

from __future__ import annotations

import asyncio

import pytest

from raydistill import grading
from raydistill.grading import math as gm
from raydistill.grading.math import extract_answer, extract_boxed, math_equal, math_equal_many


@pytest.fixture(scope="module", autouse=True)
def _pool():
    grading.configure(workers=2)
    yield
    grading.configure()  # back to the defaults (also stops this module's workers)


@pytest.mark.parametrize(("text", "expected"), [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\left\{ x \mid x^{2} > 1 \right\}}", r"\left\{ x \mid x^{2} > 1 \right\}"),
    (r"\fbox{7}", "7"),
    (r"\boxed{\fbox{8}}", "8"),
    (r"The answer is \boxed 5.", "5"),
    (r"\boxed{\text{(C)}} and later \boxed{unclosed", r"\text{(C)}"),
    ("no box here", None),
    (r"\boxedx{3}", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_answer_unwraps_math_delimiters():
    assert extract_answer(r"$\boxed{$x$}$") == ("x", True)
    assert extract_answer(r"$\frac12$") == (r"\frac12", False)
    assert extract_answer(r"\( 3 \)") == ("3", False)
    assert extract_answer("$a$ and $b$") == ("$a$ and $b$", False)


@pytest.mark.parametrize(("pred", "gold"), [
    (r"\dfrac{14}{3}", r"\frac{14}{3}"),
    (r"\tfrac{1}{2}", r"\dfrac{1}{2}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    ("033", "33"),
    ("13138980.0", "13138980"),
    ("13138980", 13138980.0),
    ("13,138,980", "13138980"),
    (r"1{,}000", "1000"),
    (r"10,\!080", "10080"),
    (r"10\,080", "10{,}080"),
    (r"\$18.90", "18.9"),
    (r"5\text{ cm}", "5"),
    ("x = 5", "5"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    ("10\\%", "10"),
    ("0.1", "10\\%"),
    ("3.1416", "3.14159"),
    ("-7", "\u22127"),
    (r"\boxed{-\frac{\pi}{6}}", r"-\frac{\pi}{6}"),
    ("4.46752e-05", 4.46752e-05),
    ("1e999999", "1E+999999"),  # huge exponents compare without decimal overflow
])
def test_equal_on_fast_paths_without_a_worker(pred, gold, monkeypatch):
    def no_pool():
        raise AssertionError("fast path must not need a worker")

    monkeypatch.setattr(gm, "get_pool", no_pool)
    assert math_equal(pred, gold) is True


@pytest.mark.parametrize(("pred", "gold"), [
    ("13138980", 13138981.0),  # GSM-Hard: integer golds are exact
    ("13138980.5", "13138981"),
    ("5.0000001", "5"),
    ("34", "33"),
    ("3.15", "3.14159"),
    ("0.2", "10\\%"),
    (r"\boxed{12}", "13"),
    ("1e999999", "5.5"),
    ("-1e-999999", "0.5"),
])
def test_not_equal_on_fast_paths_without_a_worker(pred, gold, monkeypatch):
    monkeypatch.setattr(gm, "get_pool", lambda: (_ for _ in ()).throw(AssertionError("no worker")))
    assert math_equal(pred, gold) is False


@pytest.mark.parametrize(("pred", "gold", "expected"), [
    ("0.5", r"\frac12", True),
    (r"\frac{1}{2}", "0.5", True),
    ("14/3", r"\frac{14}{3}", True),
    ("4.6667", r"\frac{14}{3}", True),  # relative 1e-4 for a non-integer gold
    ("4.67", r"\frac{14}{3}", False),
    ("1.41421", r"\sqrt{2}", True),
    ("1.414", r"\sqrt{2}", False),
    ("-14+4\\sqrt{15}", r"4\sqrt{15}-14", True),
    ("(3, \\pi/2)", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"(-\infty,-8]\cup[8,\infty)", r"(-\infty,-8]\cup [8,\infty)", True),
    (r"(-\infty,-8)\cup[8,\infty)", r"(-\infty,-8]\cup [8,\infty)", False),
    (r"\{2,1\}", r"\{1,2\}", True),
    ("p-q", "p - q", True),
    ("q-p", "p - q", False),
    ("2x-y+2z=18", "2x - y + 2z - 18 = 0", True),
    (r"y = x^2 + 1", r"x^2+1", True),
    (r"\text{(C)}", r"\text{(C)}", True),
    ("C", r"\text{(C)}", True),
    (r"\frac{2}{2^{98}}", r"\frac{1}{2^{98}}", False),  # math-verify alone calls these equal
    (r"2^{-98}", r"\frac{1}{2^{98}}", True),
    (r"\frac{990}{7}", r"\frac{990}{7}^\circ", True),
    ("The final answer is $\\frac{3}{4}$.", r"\frac34", True),
    ("I think it is $5$ apples", "6", False),
    ("5 apples", "5", True),
    ("3cba", "3abc", True),
    (r"\text{no solution}", r"\text{no solution}", True),
    (r"\frac{3^{2023}+3}{4}", r"\frac{3^{2023} + 3}{4}", True),
    (r"\frac{4^{2023}+3}{4}", r"\frac{3^{2023} + 3}{4}", False),
])
def test_symbolic_equivalence(pred, gold, expected):
    assert math_equal(pred, gold, timeout=30) is expected


def test_bad_and_missing_inputs():
    assert math_equal(None, "5") is False
    assert math_equal("", "5") is False
    assert math_equal(r"\boxed{}", "5") is False
    assert math_equal(5, "5") is True
    assert math_equal(2.5, r"\frac52") is True
    with pytest.raises(ValueError, match="gold answer is empty"):
        math_equal("5", "")
    with pytest.raises(ValueError, match="gold answer is empty"):
        math_equal("5", None)
    with pytest.raises(ValueError, match="empty"):
        math_equal("5", r"\boxed{}")


def test_gold_may_be_a_list_of_acceptable_answers():
    assert math_equal("5", ["five", "5"]) is True
    assert math_equal("0.5", [r"\text{half}", r"\frac12"], timeout=30) is True
    assert math_equal("6", ("5", "7")) is False
    assert math_equal("5", ["", "5"]) is True  # empty aliases are ignored
    with pytest.raises(ValueError, match="gold answer is empty"):
        math_equal("5", [])
    with pytest.raises(ValueError, match="gold answer is empty"):
        math_equal("5", ["", " "])
    assert grading.grade(r"\boxed{12}", ["12"], "math") == {"correct": True}


def test_math_equal_many_matches_math_equal():
    preds = ["0.5", "13138980", r"\dfrac{1}{3}", None, "q-p", r"\boxed{-14+4\sqrt{15}}"]
    golds = [r"\frac12", 13138981.0, r"\frac13", "1", "p - q", r"4\sqrt{15}-14"]
    assert math_equal_many(preds, golds, timeout=30) == [True, False, True, False, False, True]
    with pytest.raises(ValueError, match="pair 1: math_equal: the gold answer is empty"):
        math_equal_many(["1", "2"], ["1", ""])
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        math_equal_many(["1", "2"], ["1"])


def test_grade_math_domain():
    assert grading.grade(r"\boxed{\dfrac{1}{2}}", "0.5", "math") == {"correct": True}
    assert grading.grade("13138980", 13138981.0, "math") == {"correct": False}
    with pytest.raises(ValueError, match="unknown grading domain 'code'"):
        grading.grade("1", "1", "code")


def test_amath_equal_in_an_event_loop():
    async def main():
        return await asyncio.gather(grading.amath_equal(r"\sqrt{8}", r"2\sqrt{2}", timeout=30),
                                    grading.amath_equal("13138980", 13138981.0),
                                    grading.amath_equal(None, "1"))

    assert asyncio.run(main()) == [True, False, False]
