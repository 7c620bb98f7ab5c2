"""qa_scores: SQuAD normalisation, token F1, aliases, answer wrappers; grade() for the qa domain."""

from __future__ import annotations

import pytest

from raydistill.grading import extract_qa_answer, grade, normalize_answer, qa_scores


@pytest.mark.parametrize(("raw", "norm"), [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple, a pear & the fig. ", "apple pear fig"),
    ("Theodore", "theodore"),  # "the" only as a whole word
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_f1_basics():
    assert qa_scores("Paris", "paris") == {"em": 1.0, "f1": 1.0}
    assert qa_scores("the Paris.", "Paris") == {"em": 1.0, "f1": 1.0}
    assert qa_scores("London", "Paris") == {"em": 0.0, "f1": 0.0}
    s = qa_scores("Barack Obama", "Barack Hussein Obama")
    assert s["em"] == 0.0 and s["f1"] == pytest.approx(2 * 1.0 * (2 / 3) / (1.0 + 2 / 3))
    # repeated tokens count once per occurrence in the overlap
    assert qa_scores("new new york", "new york")["f1"] == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))


def test_aliases_take_the_best_match():
    gold = ["Richard Nixon", "President Richard Nixon", "Nixon"]
    assert qa_scores("nixon", gold) == {"em": 1.0, "f1": 1.0}
    s = qa_scores("Richard M. Nixon", gold)
    assert s["em"] == 0.0 and s["f1"] == pytest.approx(0.8)
    assert qa_scores("Ford", ("Nixon", "Richard Nixon")) == {"em": 0.0, "f1": 0.0}


def test_prediction_wrappers_are_removed():
    assert extract_qa_answer(r"Thus \boxed{\text{Crambidae}}") == "Crambidae"
    assert extract_qa_answer("<think>x</think><answer> US 60 </answer>") == "US 60"
    assert extract_qa_answer("<answer>first</answer> then <answer>\\boxed{second}</answer>") == "second"
    assert qa_scores(r"\boxed{\text{Crambidae}}", "Crambidae")["em"] == 1.0
    assert qa_scores("reasoning... <ANSWER>US 60</ANSWER>", "US 60")["em"] == 1.0


def test_empty_prediction_and_bad_gold():
    assert qa_scores(None, "x") == {"em": 0.0, "f1": 0.0}
    assert qa_scores("", "x") == {"em": 0.0, "f1": 0.0}
    assert qa_scores(2003, "2003")["em"] == 1.0
    with pytest.raises(ValueError, match="gold answer is empty"):
        qa_scores("x", "")
    with pytest.raises(ValueError, match="gold answer is empty"):
        qa_scores("x", [])
    with pytest.raises(ValueError, match="must be strings"):
        qa_scores("x", ["a", 3])


def test_grade_qa_correct_is_em_unless_an_f1_threshold_is_given():
    r = grade("Barack Obama", "Barack Hussein Obama", "qa")
    assert r["correct"] is False and r["em"] == 0.0 and r["f1"] == pytest.approx(0.8)
    assert grade("Barack Obama", "Barack Hussein Obama", "qa", f1_threshold=0.8)["correct"] is True
    assert grade("Barack Obama", "Barack Hussein Obama", "qa", f1_threshold=0.9)["correct"] is False
    assert grade("the Beatles", ["Beatles", "The Fab Four"], "qa") == {"correct": True, "em": 1.0, "f1": 1.0}
    with pytest.raises(ValueError, match="f1_threshold"):
        grade("a", "a", "qa", f1_threshold=0.0)
