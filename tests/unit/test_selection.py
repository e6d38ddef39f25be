"""Evaluation-time selection (official rules): budget, frame weights, importance quotas, coverage spacing.

Exact agreement with the official outputs is in test_golden_selection.py; these are hand cases and properties.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cacovid_rl.policy.selection import (
    budget,
    default_grid,
    evenly_spaced,
    frame_weights,
    importance_quotas,
    official_spaced,
    select_tokens,
    select_tokens_detailed,
)
from cacovid_rl.types import PolicyScores

FAST = settings(max_examples=15, deadline=None)


def test_hand_computed_selection() -> None:
    # T=2, N=4 (grid 2x2), retention 0.5 -> B=4; max_ratio = 0.75.
    # Frame scores [1, -1] -> [3, -3] -> softmax [0.9975, 0.0025] -> clip [1/4, 1/(2*0.5)*0.75] -> [0.75, 0.25].
    # Quotas: round(w * round(0.5*0.5*2*2*2) = 2) = round([1.5, 0.5]) = [2, 0] (half to even), clamped to
    # [1, int(0.5*2*2*0.75) = 1] -> [1, 1], which sums to floor(2.0). Frame 0's best token is 1, frame 1's is 1 (5).
    # Coverage: 2 of the free tokens [0, 2, 3, 4, 6, 7] at round(linspace(0, 5, 2)) = [0, 5] -> tokens 0 and 7.
    token = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.8, 0.1, 0.0]])
    sel = select_tokens_detailed(PolicyScores(token, torch.tensor([1.0, -1.0])), 0.5, 0.5)
    assert sel.quotas == [1, 1]
    assert sel.importance.tolist() == [1, 5]
    assert sel.num_coverage == 2
    assert sel.keep.tolist() == [0, 1, 5, 7]
    assert torch.equal(select_tokens(PolicyScores(token, torch.tensor([1.0, -1.0])), 0.5, 0.5), sel.keep)


def test_frame_weights_hand_case() -> None:
    w = frame_weights(torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(frame_weights(torch.zeros(4)), torch.full((4,), 0.25))
    # scale invariance: only the shape of the scores matters after scaling to max |3|
    torch.testing.assert_close(frame_weights(torch.tensor([2.0, 1.0, 0.0])), frame_weights(torch.tensor([4.0, 2, 0])))
    # the official upper clip is max_ratio / (t * retention): 0.25 / (2 * 0.5) = 0.25 -> both at 0.25 -> uniform
    torch.testing.assert_close(frame_weights(torch.tensor([1.0, -1.0]), 0.5, 0.25), torch.tensor([0.5, 0.5]))
    # with the default max_ratio (1.5 * retention) the cap is 1.5 / t whatever the retention
    torch.testing.assert_close(frame_weights(torch.tensor([1.0, -1.0]), 0.1), torch.tensor([0.75, 0.25]))


@FAST
@given(t=st.integers(1, 40), seed=st.integers(0, 1000))
def test_frame_weights_are_clipped(t: int, seed: int) -> None:
    torch.manual_seed(seed)
    w = frame_weights(torch.randn(t) * 10)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    # after renormalisation the bounds can move by the renormalisation factor, which lies in [2/3, 2]
    assert (w <= 1.5 / t * 2 + 1e-6).all() and (w >= 1 / (2 * t) * 2 / 3 - 1e-6).all()


def test_quota_cap_zero_hands_the_budget_out_from_frame_0() -> None:
    # Official quirk: cap int(0.5 * 16 * 0.075) = 0, so the clamp to [1, 0] gives 0 everywhere and the importance
    # budget floor(0.5 * 0.05 * 16 * 4) = 1 goes to argmin = frame 0, even though frame 3 has by far the most weight.
    weights = torch.tensor([0.1, 0.1, 0.1, 0.7])
    assert importance_quotas(weights, 0.05, 0.5, 0.075, (4, 4)) == [1, 0, 0, 0]


def test_quota_overshoot_is_removed_from_the_first_largest_frames() -> None:
    # round(0.25 * round(1.6) = 2) = round(0.5) = 0 -> clamp to 1 each -> sum 4 vs floor(1.6) = 1: three decrements,
    # each at argmax = the first frame among equals, leaving frames at quota 0.
    assert importance_quotas(torch.full((4,), 0.25), 0.05, 0.5, 0.5, (4, 4)) == [0, 0, 0, 1]


def test_quota_increments_go_to_the_first_smallest_frame() -> None:
    # t=8, N=50 (grid 50x1), retention 0.2, imp 1, max_ratio 0.3: weights [0.1]*7 + [0.3] (frame 3 dominant);
    # quotas round([8]*7 + [24]) clamped to cap int(50 * 0.3) = 15 -> sum 71 vs 80: nine +1 at argmin.
    weights = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.1, 0.1, 0.1, 0.1])
    assert importance_quotas(weights, 0.2, 1.0, 0.3, (50, 1)) == [10, 10, 9, 15, 9, 9, 9, 9]


def test_official_spaced_rounds_half_to_even() -> None:
    # linspace(0, 5, 3) = [0, 2.5, 5]: the official float32 linspace + round gives 2 (half to even), the exact
    # integer spacing used by the baselines gives 3 (half up).
    assert official_spaced(6, 3).tolist() == [0, 2, 5]
    assert evenly_spaced(6, 3).tolist() == [0, 3, 5]
    assert official_spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert official_spaced(7, 1).tolist() == [0]
    assert official_spaced(7, 0).tolist() == []
    with pytest.raises(ValueError):
        official_spaced(3, 4)


def test_evenly_spaced() -> None:
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert evenly_spaced(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(7, 1).tolist() == [0]
    assert evenly_spaced(7, 0).tolist() == []
    with pytest.raises(ValueError):
        evenly_spaced(3, 4)


def test_default_grid() -> None:
    assert default_grid(196) == (14, 14)
    assert default_grid(16) == (4, 4)
    assert default_grid(50) == (50, 1)


@FAST
@given(
    t=st.integers(1, 12),
    n=st.integers(1, 30),
    retention=st.floats(0.001, 1.0),
    imp_ratio=st.floats(0.0, 0.999),
    seed=st.integers(0, 10_000),
)
def test_select_tokens_exact_budget(t: int, n: int, retention: float, imp_ratio: float, seed: int) -> None:
    torch.manual_seed(seed)
    scores = PolicyScores(torch.randn(t, n), torch.randn(t))
    keep = select_tokens(scores, retention, imp_ratio)
    h, w = default_grid(n)
    b = max(1, math.floor(retention * t * h * w))  # the official expression (no float slack)
    assert keep.shape == (b,)
    assert keep.dtype == torch.long
    assert (keep.diff() > 0).all() if b > 1 else True
    assert (keep >= 0).all() and (keep < t * n).all()
    assert torch.equal(keep, select_tokens(scores, retention, imp_ratio))


@FAST
@given(t=st.integers(1, 8), n=st.integers(2, 30), retention=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_importance_only_takes_per_frame_top_tokens(t: int, n: int, retention: float, seed: int) -> None:
    torch.manual_seed(seed)
    token = torch.randn(t, n)
    sel = select_tokens_detailed(PolicyScores(token, torch.randn(t)), retention, imp_ratio=1.0)
    keep = sel.keep
    assert sel.num_coverage == 0 and torch.equal(keep, sel.importance)
    counts = torch.bincount(keep // n, minlength=t)
    assert counts.tolist() == [min(q, n) for q in sel.quotas]
    rank = torch.empty(t, n, dtype=torch.long)
    rank.scatter_(1, token.argsort(dim=-1, descending=True, stable=True), torch.arange(n).expand(t, n))
    kept_rank = rank.reshape(-1)[keep]
    for f in range(t):
        ranks = kept_rank[keep // n == f].sort().values
        assert torch.equal(ranks, torch.arange(int(counts[f]))), "each frame keeps a prefix of its ranking"


def test_ranking_uses_the_official_float32_softmax() -> None:
    # Scores 1.0 and 1.0 + 1e-6 tie after softmax(0.001 * s) in float32: the official ranking cannot tell them
    # apart, and the tie goes to the lower index, so token 0 is kept although token 1 scores higher.
    token = torch.tensor([[1.0, 1.0 + 1e-6, -5.0, -5.0]])
    keep = select_tokens(PolicyScores(token, torch.zeros(1)), 0.25, imp_ratio=1.0)
    assert keep.tolist() == [0]


def test_zero_importance_is_uniform_coverage() -> None:
    scores = PolicyScores(torch.randn(4, 25), torch.randn(4))
    assert torch.equal(select_tokens(scores, 0.2, imp_ratio=0.0), official_spaced(100, 20))


def test_high_frame_score_gets_more_tokens() -> None:
    t, n = 8, 50
    frame = torch.zeros(t)
    frame[3] = 5.0
    sel = select_tokens_detailed(PolicyScores(torch.randn(t, n), frame), 0.2, imp_ratio=1.0)
    counts = torch.bincount(sel.keep // n, minlength=t)
    assert counts[3] == counts.max() and counts[3] > counts[0]
    assert counts[3] == int(1.0 * n * 1 * (1.5 * 0.2))  # at the official per-frame cap


def test_grid_must_hold_the_frame() -> None:
    with pytest.raises(ValueError, match="grid"):
        select_tokens(PolicyScores(torch.randn(2, 6), torch.randn(2)), 0.5, grid_hw=(2, 2))
    a = select_tokens(PolicyScores(torch.randn(2, 6), torch.randn(2)), 0.5, grid_hw=(2, 3))
    assert a.numel() == 6


@pytest.mark.parametrize("retention", [0.0, -0.5, 1.01, float("nan"), float("inf"), "0.5", True])
def test_bad_retention_names_value_and_range(retention: object) -> None:
    scores = PolicyScores(torch.randn(2, 4), torch.randn(2))
    with pytest.raises(ValueError, match=r"retention .* \(0, 1\]"):
        select_tokens(scores, retention)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retention"):
        budget(retention, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_ratio", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_max_ratio_is_named(max_ratio: object) -> None:
    with pytest.raises(ValueError, match="max_ratio"):
        select_tokens(PolicyScores(torch.randn(2, 4), torch.randn(2)), 0.5, max_ratio=max_ratio)  # type: ignore[arg-type]


def test_budget_float_slack_and_minimum() -> None:
    assert budget(0.29, 100) == 29
    assert budget(0.1, 6272) == 627
    assert budget(1e-6, 100) == 1
    assert budget(1.0, 7) == 7


def test_selection_budget_is_the_official_floor_at_least_one() -> None:
    # 0.29 * 2 * 50 = 28.999999999999996: the official floor keeps 28 (budget() for the baselines keeps 29).
    scores = PolicyScores(torch.randn(2, 50), torch.randn(2))
    assert select_tokens(scores, 0.29).numel() == 28
    assert budget(0.29, 2 * 50) == 29
    assert select_tokens(scores, 0.001).numel() == 1  # official: 0 tokens
    assert select_tokens(scores, 0.001, imp_ratio=1.0).numel() == 1


def test_non_finite_scores_raise() -> None:
    with pytest.raises(ValueError, match="token scores"):
        select_tokens(PolicyScores(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1)), 0.5)
    with pytest.raises(ValueError, match="frame scores"):
        select_tokens(PolicyScores(torch.zeros(1, 2), torch.tensor([float("inf")])), 0.5)
    with pytest.raises(ValueError, match="imp_ratio"):
        select_tokens(PolicyScores(torch.zeros(1, 2), torch.zeros(1)), 0.5, imp_ratio=1.5)
