"""Correctness rewards: table-driven per problem type, including unparsable output."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacovid_rl.rl.rewards import (
    PROBLEM_TYPES,
    batch_rewards,
    compute_reward,
    edit_distance,
    extract_answer,
    lcs_length,
    rouge_n_f1,
    word_error_rate,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>B</answer>", "B"),
        ("I think <answer> 3.14 </answer> done", "3.14"),
        ("no tags here  ", "no tags here"),
        ("<answer>A</answer> wait <answer>C</answer>", "C"),
        ("reasoning <answer>D", "D"),
        ("<ANSWER>x</ANSWER>", "x"),
        ("<answer>line1\nline2</answer>", "line1\nline2"),
        ("", ""),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


CASES = [
    # multiple choice: first character after stripping
    ("multiple choice", "B", "<answer>B</answer>", 1.0),
    ("multiple choice", "B. The red car", "B", 1.0),
    ("multiple choice", "(C)", "C", 1.0),
    ("multiple choice", "<answer>A</answer>", "<answer>B</answer>", 0.0),
    ("multiple choice", "b", "B", 0.0),
    ("multiple choice", "", "B", 0.0),
    ("multiple choice", "   ", "B", 0.0),
    # numerical: decimal-point agreement, commas removed, 2-decimal rounding
    ("numerical", "42", "42", 1.0),
    ("numerical", "1,000", "1000", 1.0),
    ("numerical", "3.14159", "3.14", 1.0),
    ("numerical", "3.0", "3", 0.0),
    ("numerical", "3", "3.0", 0.0),
    ("numerical", "41", "42", 0.0),
    ("numerical", "forty-two", "42", 0.0),
    ("numerical", "nan", "42", 0.0),
    ("numerical", "<answer>7</answer>", "<answer>7</answer>", 1.0),
    # OCR: 1 - WER, clipped
    ("OCR", "hello world", "hello world", 1.0),
    ("OCR", "hello there world", "hello world", 0.5),
    ("OCR", "hello", "hello big world", 1 / 3),
    ("OCR", "a b c d e f g", "x", 0.0),
    ("OCR", "", "", 1.0),
    # regression: 1 - min(1, |p - g| / |g|)
    ("regression", "90", "100", 0.9),
    ("regression", "150", "100", 0.5),
    ("regression", "500", "100", 0.0),
    ("regression", "-10", "-10", 1.0),
    ("regression", "0", "0", 1.0),
    ("regression", "1", "0", 0.0),
    ("regression", "about ten", "10", 0.0),
    ("regression", "inf", "10", 0.0),
    # free-form: mean ROUGE-1/2/L F1
    ("free-form", "The cat sat.", "the cat sat", 1.0),
    ("free-form", "dog", "the cat sat", 0.0),
    ("free-form", "", "the cat sat", 0.0),
]


@pytest.mark.parametrize(("problem_type", "pred", "gt", "expected"), CASES)
def test_reward_table(problem_type: str, pred: str, gt: str, expected: float) -> None:
    assert compute_reward(pred, gt, problem_type) == pytest.approx(expected, abs=1e-6)


def test_free_form_partial_overlap_by_hand() -> None:
    # pred "the cat ran", ref "the cat sat":
    # ROUGE-1: overlap 2 of 3/3 -> F 2/3; ROUGE-2: bigrams {the cat, cat ran} vs {the cat, cat sat} -> 1/2;
    # ROUGE-L: LCS "the cat" = 2 -> 2/3. Mean = (2/3 + 1/2 + 2/3) / 3 = 11/18.
    assert compute_reward("the cat ran", "the cat sat", "free-form") == pytest.approx(11 / 18)


def test_rouge_l_uses_subsequence_not_substring() -> None:
    assert lcs_length(["a", "x", "b", "y", "c"], ["a", "b", "c"]) == 3
    # ROUGE-2 counts clipped n-gram matches
    assert rouge_n_f1(["a", "a", "a"], ["a", "a"], 1) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_edit_distance_and_wer() -> None:
    assert edit_distance(["kitten", "sitting"], ["kitten", "sitting"]) == 0
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert word_error_rate("a b c", "a c") == pytest.approx(1 / 3)
    assert word_error_rate("", "extra words") == 2.0  # divided by max(1, 0)


def test_unknown_problem_type_raises() -> None:
    with pytest.raises(ValueError, match="unknown problem_type 'essay'"):
        compute_reward("x", "y", "essay")
    with pytest.raises(ValueError, match="problem_type"):
        batch_rewards([], "y", "essay")


def test_batch_rewards_dtype_and_values() -> None:
    out = batch_rewards(["A", "B", "<answer>A</answer>", ""], "<answer>A</answer>", "multiple choice")
    assert out.dtype == np.float32
    assert out.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert batch_rewards([], "A", "multiple choice").shape == (0,)


def test_problem_types_constant() -> None:
    assert PROBLEM_TYPES == ("multiple choice", "numerical", "OCR", "free-form", "regression")


@settings(max_examples=40, deadline=None)
@given(pred=st.text(max_size=60), gt=st.text(max_size=30), problem_type=st.sampled_from(PROBLEM_TYPES))
def test_never_raises_and_stays_in_unit_interval(pred: str, gt: str, problem_type: str) -> None:
    r = compute_reward(pred, gt, problem_type)
    assert 0.0 <= r <= 1.0


def test_non_string_output_scores_zero() -> None:
    assert compute_reward(None, "A", "multiple choice") == 0.0  # type: ignore[arg-type]
