"""Rewards against the official ``accuracy_reward`` outputs (tests/golden/rewards.json, 134 cases).

``fix_official_bugs=False`` must give every official value; ``True`` must give every value the golden data does not
flag as a bug, and the value pinned here for each of the 21 flagged ones (the fixes, rl/rewards.py docstring).
"""

from __future__ import annotations

import pytest

from cacovid_rl.rl.rewards import compute_reward
from tests.golden_io import load_golden

CASES = load_golden("rewards")["cases"]
TOL = 1e-9

# (problem_type, prediction, solution) -> reward with the official bugs fixed, and why.
FIXED: dict[tuple[str, str, str], float] = {
    # multiple choice: the option label is compared, not the first character; no label never matches
    ("multiple choice", "(D)", "<answer>(C)</answer>"): 0.0,
    ("multiple choice", "**D**", "<answer>**C**</answer>"): 0.0,
    ("multiple choice", "Correct answer: A", "<answer>C</answer>"): 0.0,  # the word "Correct" is no option C
    ("multiple choice", "", " . "): 0.0,
    ("multiple choice", "", "<answer></answer>"): 0.0,
    ("multiple choice", "...", "<answer>.</answer>"): 0.0,
    ("multiple choice", "10", "<answer>1</answer>"): 0.0,
    # numerical: thousands commas and decimal commas read as such
    ("numerical", "2,500", "<answer>2500</answer>"): 1.0,
    ("numerical", "2500", "<answer>2,500</answer>"): 1.0,
    ("numerical", "3,5", "<answer>3.5</answer>"): 1.0,
    # free-form: non-Latin words kept, ROUGE-2 left out when neither text has a bigram
    ("free-form", "собака бежит", "<answer>собака бежит</answer>"): 1.0,
    ("free-form", "狗在跑 dog", "<answer>狗在跑 dog</answer>"): 1.0,
    ("free-form", "dog", "<answer>dog</answer>"): 1.0,
    # regression: ground truth 0 scores |p| <= 1e-9, nan scores 0, decimal comma, guard capped at 1e-6 |g|
    ("regression", "-0", "<answer>0.0</answer>"): 1.0,
    ("regression", "0.0", "<answer>0</answer>"): 1.0,
    ("regression", "0.0000000005", "<answer>0</answer>"): 1.0,
    ("regression", "nan", "<answer>40</answer>"): 0.0,
    ("regression", "NaN", "<answer>0.5</answer>"): 0.0,
    ("regression", "40", "<answer>nan</answer>"): 0.0,
    ("regression", "12.5", "<answer>12,5</answer>"): 1.0 - 1e-9 / (12.5 + 1e-9),
    ("regression", "1e-12", "<answer>2e-12</answer>"): 1.0 - (1e-12 + 2e-18) / (2e-12 + 2e-18),
}


def _key(case: dict) -> tuple[str, str, str]:
    return case["problem_type"], case["prediction"], case["solution"]


def test_golden_file_is_complete() -> None:
    assert len(CASES) == 134
    bugs = {_key(c) for c in CASES if c["official_bug"]}
    assert bugs == set(FIXED), "every flagged case needs exactly one pinned fixed value"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['problem_type']}:{c['prediction']!r}")
def test_official_mode_matches_every_case(case: dict) -> None:
    got = compute_reward(case["prediction"], case["solution"], case["problem_type"], fix_official_bugs=False)
    assert got == pytest.approx(case["official_reward"], abs=TOL), case["note"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['problem_type']}:{c['prediction']!r}")
def test_fixed_mode_keeps_non_bugs_and_fixes_bugs(case: dict) -> None:
    got = compute_reward(case["prediction"], case["solution"], case["problem_type"], fix_official_bugs=True)
    expected = FIXED[_key(case)] if case["official_bug"] else case["official_reward"]
    assert got == pytest.approx(expected, abs=TOL), case["note"]
    if case["official_bug"]:
        assert abs(got - case["official_reward"]) > 1e-3, "a flagged case must change"


def test_ground_truth_may_be_the_extracted_answer() -> None:
    """Callers pass ``QARecord.answer`` (already parsed): parsing is idempotent, so the reward is the same."""
    from cacovid_rl.answers import extract_answer

    for case in CASES:
        for fix in (False, True):
            raw = compute_reward(case["prediction"], case["solution"], case["problem_type"], fix)
            parsed = compute_reward(case["prediction"], extract_answer(case["solution"]), case["problem_type"], fix)
            assert raw == parsed, case
