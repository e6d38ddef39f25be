"""Correctness rewards: the answer parser, the fixes to the official bugs, the tokenizer and robustness.

The official values themselves are checked against the official code's outputs in test_golden_rewards.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacovid_rl.rl.rewards import (
    PROBLEM_TYPES,
    batch_rewards,
    compute_reward,
    extract_answer,
    mc_option_key,
    mc_prefix_decided,
    rouge_tokens,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>B</answer>", "B"),
        ("I think <answer> 3.14 </answer> done", "3.14"),
        ("no tags here  ", "no tags here  "),  # no tag: the text as it is
        ("<answer>A</answer> wait <answer>C</answer>", "A"),  # the first block
        ("reasoning <answer>D", "reasoning <answer>D"),  # unclosed: the raw text
        ("<ANSWER>x</ANSWER>", "<ANSWER>x</ANSWER>"),  # the tag name is case-sensitive
        ("<answer>line1\nline2</answer>", "line1\nline2"),
        ("<answer><answer>A</answer>", "<answer>A"),
        ("", ""),
    ],
)
def test_extract_answer_is_the_official_parser(text: str, expected: str) -> None:
    assert extract_answer(text) == expected
    assert extract_answer(extract_answer(text)) == extract_answer(text)  # idempotent


def test_problem_types_have_one_owner() -> None:
    from cacovid_rl import answers
    from cacovid_rl.data import prompts, records

    assert PROBLEM_TYPES == ("multiple choice", "numerical", "OCR", "free-form", "regression")
    assert prompts.PROBLEM_TYPES is records.PROBLEM_TYPES is answers.PROBLEM_TYPES is PROBLEM_TYPES
    assert records.extract_answer is answers.extract_answer is extract_answer


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("C", "C"),
        ("C) a red umbrella", "C"),
        ("(C)", "(C"),
        ("**D**", "**D"),
        ("..C..", "C"),
        ("10", "10"),
        ("Correct answer: A", "Correct"),
        ("", None),
        (" . ", None),
        ("...", None),
        ("(", None),
    ],
)
def test_mc_option_key(text: str, key: str | None) -> None:
    assert mc_option_key(text) == key


# Fixed-mode values beyond the golden cases; (type, prediction, ground truth, fixed, official).
FIXES = [
    ("multiple choice", "B", "<answer>B</answer>", 1.0, 1.0),
    ("multiple choice", "B. The red car", "B", 1.0, 1.0),
    ("multiple choice", "Banana", "B", 0.0, 1.0),
    ("multiple choice", "C is correct", "C", 1.0, 1.0),
    ("multiple choice", "A\n(B)", "A", 1.0, 1.0),
    ("numerical", "1,234,567.5", "1234567.5", 1.0, 1.0),
    ("numerical", "1,234", "1234", 1.0, 0.0),
    ("numerical", "0,75", "0.75", 1.0, 0.0),
    ("numerical", "1,2,3", "123", 0.0, 0.0),  # not a thousands pattern: the official reading (a decimal mark)
    ("numerical", "inf", "inf", 1.0, 1.0),
    ("regression", "inf", "inf", 0.0, 1.0),  # inf - inf is nan: the official scores it 1
    ("regression", "1", "0", 0.0, 0.0),
    ("regression", "-1e-10", "0", 1.0, 0.0),
    ("regression", "90", "100", 0.9, 0.9),
    ("free-form", "", "", 0.0, 0.0),
    ("free-form", "cat", "dog", 0.0, 0.0),
    ("free-form", "नमस्ते दुनिया", "नमस्ते दुनिया", 1.0, 0.0),  # Devanagari vowel signs stay inside the word
    ("OCR", "", "", 1.0, 1.0),  # both empty: no word errors (not flagged by the golden data, kept)
]


@pytest.mark.parametrize(("problem_type", "pred", "gt", "fixed", "official"), FIXES)
def test_fixed_and_official_values(problem_type: str, pred: str, gt: str, fixed: float, official: float) -> None:
    assert compute_reward(pred, gt, problem_type, fix_official_bugs=True) == pytest.approx(fixed, abs=1e-6)
    assert compute_reward(pred, gt, problem_type, fix_official_bugs=False) == pytest.approx(official, abs=1e-6)


def test_rouge_tokens_equal_rouge_score_on_latin_text() -> None:
    """The fixed tokenizer only adds non-Latin words: Latin text (accents included) tokenizes as rouge_score."""
    from nltk.stem import porter
    from rouge_score import tokenize

    stemmer = porter.PorterStemmer()
    texts = [
        "The children played football.",
        "naïve café owner",
        "state-of-the-art, 3 birds!",
        "ǅungla Œuvre ﬁne",
        "Ḁḁ ｆｕｌｌ ²½ª",
    ]
    for text in texts:
        assert rouge_tokens(text, stemmer) == tokenize.tokenize(text, stemmer)
    assert rouge_tokens("狗在跑 dog", stemmer) == ["狗", "在", "跑", "dog"]
    assert rouge_tokens("Собака-бежит", stemmer) == ["собака", "бежит"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x24F), max_size=40))
def test_rouge_tokens_equal_rouge_score_on_any_latin_text(text: str) -> None:
    from nltk.stem import porter
    from rouge_score import tokenize

    stemmer = porter.PorterStemmer()
    assert rouge_tokens(text, stemmer) == tokenize.tokenize(text, stemmer)


@settings(max_examples=300, deadline=None)
@given(prefix=st.text(alphabet="AB1 .()*\n:é", max_size=8), suffix=st.text(alphabet="AB1 .()*\n:é", max_size=8))
def test_mc_prefix_decided_means_the_reward_is_final(prefix: str, suffix: str) -> None:
    """What models/base.py's multiple-choice fast path relies on: once decided, no continuation changes a reward."""
    if mc_prefix_decided(prefix):
        for fix in (True, False):
            for gt in ("A", "(A)", "1"):
                a = compute_reward(prefix, gt, "multiple choice", fix)
                assert compute_reward(prefix + suffix, gt, "multiple choice", fix) == a


def test_mc_prefix_decided_examples() -> None:
    assert not mc_prefix_decided("")
    assert not mc_prefix_decided(" ..")
    assert not mc_prefix_decided("A")  # could still become "Apple"
    assert mc_prefix_decided("A ")
    assert mc_prefix_decided("(B)")
    assert not mc_prefix_decided("A\ufffd")


def test_unknown_problem_type_scores_zero() -> None:
    """As the official reward; records with such a type are skipped at load time (data/records.py)."""
    assert compute_reward("x", "x", "essay") == 0.0
    assert compute_reward("C", "C", "Multiple Choice", fix_official_bugs=False) == 0.0
    assert batch_rewards(["x", "y"], "x", "essay").tolist() == [0.0, 0.0]


def test_batch_rewards_dtype_and_flag() -> None:
    out = batch_rewards(["A", "B", "<answer>A</answer>", ""], "<answer>A</answer>", "multiple choice")
    assert out.dtype == np.float32
    assert out.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert batch_rewards([], "A", "multiple choice").shape == (0,)
    assert batch_rewards(["nan"], "4", "regression", fix_official_bugs=False).tolist() == [1.0]
    assert batch_rewards(["nan"], "4", "regression", fix_official_bugs=True).tolist() == [0.0]


@settings(max_examples=60, deadline=None)
@given(
    pred=st.text(max_size=60),
    gt=st.text(max_size=30),
    problem_type=st.sampled_from(PROBLEM_TYPES),
    fix=st.booleans(),
)
def test_never_raises_and_stays_in_unit_interval(pred: str, gt: str, problem_type: str, fix: bool) -> None:
    r = compute_reward(pred, gt, problem_type, fix)
    assert 0.0 <= r <= 1.0


def test_non_string_output_scores_zero() -> None:
    assert compute_reward(None, "A", "multiple choice") == 0.0  # type: ignore[arg-type]
