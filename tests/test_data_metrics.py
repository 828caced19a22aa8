"""Generation metrics: the benchmark's answer normalisation, exact match, ROUGE-L."""

from __future__ import annotations

import pytest

from llamaforge.eval.metrics import exact_match, normalize_answer, rouge_l, score_generations


def test_normalize_answer_as_the_benchmark():
    assert normalize_answer("  What's your FAVORITE smell?! ") == "whats your favorite smell"
    assert normalize_answer("Mozart or Beethoven?") == "mozart or beethoven"
    assert normalize_answer("a\nb") == "ab"  # newlines are dropped, as re.sub([^a-z0-9 ]) does
    assert normalize_answer("a  b") == "a  b"
    assert normalize_answer("a  b", collapse_spaces=True) == "a b"
    assert normalize_answer("Café №5") == "caf 5"


def test_exact_match():
    assert exact_match("what's your favorite smell", "What's your favorite smell?") == 1.0
    assert exact_match("What is your favorite smell?", "What's your favorite smell?") == 0.0


def test_rouge_l_uses_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    ref = "What would you do if you had a million dollars?"
    pred = "what would you do with a million dollars"
    want = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l(pred, ref) == pytest.approx(want)
    # LCS "what would you do a million dollars" = 7 tokens; P = 7/8, R = 7/10
    assert rouge_l(pred, ref) == pytest.approx(2 * (7 / 8) * (7 / 10) / (7 / 8 + 7 / 10))
    assert rouge_l(ref, ref) == 1.0 and rouge_l("", ref) == 0.0


def test_score_generations_means():
    preds = ["Mozart or Beethoven?", "pigs fly", "nothing"]
    refs = ["Mozart or Beethoven?", "What if pigs could fly?", "Who is your hero?"]
    got = score_generations(preds, refs)
    assert set(got) == {"exact_match", "rouge_l"}
    assert got["exact_match"] == pytest.approx(1 / 3)
    assert got["rouge_l"] == pytest.approx((1.0 + rouge_l(preds[1], refs[1]) + 0.0) / 3)
    assert score_generations([], []) == {"exact_match": 0.0, "rouge_l": 0.0}
    with pytest.raises(ValueError, match="2 predictions for 1"):
        score_generations(["a", "b"], ["a"])
