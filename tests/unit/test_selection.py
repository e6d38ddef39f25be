"""Evaluation-time selection: exact budget, frame-weighted importance quotas, even coverage of the rest."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cacovid_rl.policy.selection import budget, evenly_spaced, frame_quotas, frame_weights, select_tokens
from cacovid_rl.types import PolicyScores

FAST = settings(max_examples=15, deadline=None)


def test_hand_computed_selection() -> None:
    # T=2, N=4, retention 0.5 -> B=4, importance part 2.
    # Frame scores [1, -1] -> [3, -3] -> softmax [0.9975, 0.0025] -> clip [1/4, 3/4] -> [0.75, 0.25].
    # Quotas: cap = ceil(1.5 * 2 / 2) = 2; targets [1.5, 0.5] -> floor [1, 0]; the missing one goes to the
    # larger remainder (tie 0.5/0.5 -> frame 0) -> [2, 0]. Frame 0's top-2 tokens are 1 and 2.
    # Free tokens [0, 3, 4, 5, 6, 7]; 2 evenly spaced among 6 -> positions 0 and 5 -> tokens 0 and 7.
    token = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.8, 0.1, 0.0]])
    keep = select_tokens(PolicyScores(token, torch.tensor([1.0, -1.0])), 0.5, 0.5)
    assert keep.tolist() == [0, 1, 2, 7]


def test_frame_weights_hand_case() -> None:
    w = frame_weights(torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(frame_weights(torch.zeros(4)), torch.full((4,), 0.25))
    # scale invariance: only the shape of the scores matters after scaling to max |3|
    torch.testing.assert_close(frame_weights(torch.tensor([2.0, 1.0, 0.0])), frame_weights(torch.tensor([4.0, 2, 0])))


@FAST
@given(t=st.integers(1, 40), seed=st.integers(0, 1000))
def test_frame_weights_are_clipped(t: int, seed: int) -> None:
    torch.manual_seed(seed)
    w = frame_weights(torch.randn(t) * 10)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    # after renormalisation the bounds can move by the renormalisation factor, which lies in [2/3, 2]
    assert (w <= 1.5 / t * 2 + 1e-6).all() and (w >= 1 / (2 * t) * 2 / 3 - 1e-6).all()


def test_frame_quotas_cap_and_exact_total() -> None:
    q = frame_quotas(torch.tensor([0.7, 0.1, 0.1, 0.1]), 10, 5)
    assert q.tolist() == [4, 2, 2, 2]  # frame 0 capped at ceil(1.5 * 10 / 4) = 4
    assert frame_quotas(torch.tensor([0.5, 0.5]), 0, 5).tolist() == [0, 0]


def test_evenly_spaced() -> None:
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert evenly_spaced(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(7, 1).tolist() == [0]
    assert evenly_spaced(7, 0).tolist() == []
    with pytest.raises(ValueError):
        evenly_spaced(3, 4)


@FAST
@given(
    t=st.integers(1, 12),
    n=st.integers(1, 30),
    retention=st.floats(0.001, 1.0),
    imp_ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_select_tokens_exact_budget(t: int, n: int, retention: float, imp_ratio: float, seed: int) -> None:
    torch.manual_seed(seed)
    scores = PolicyScores(torch.randn(t, n), torch.randn(t))
    keep = select_tokens(scores, retention, imp_ratio)
    b = max(1, math.floor(retention * t * n + 1e-9))
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
    keep = select_tokens(PolicyScores(token, torch.randn(t)), retention, imp_ratio=1.0)
    b = keep.numel()
    counts = torch.bincount(keep // n, minlength=t)
    assert (counts <= min(n, math.ceil(1.5 * b / t))).all()
    rank = torch.empty(t, n, dtype=torch.long)
    rank.scatter_(1, token.argsort(dim=-1, descending=True, stable=True), torch.arange(n).expand(t, n))
    kept_rank = rank.reshape(-1)[keep]
    for f in range(t):
        ranks = kept_rank[keep // n == f].sort().values
        assert torch.equal(ranks, torch.arange(int(counts[f]))), "each frame keeps a prefix of its ranking"


def test_zero_importance_is_uniform_coverage() -> None:
    scores = PolicyScores(torch.randn(4, 25), torch.randn(4))
    assert torch.equal(select_tokens(scores, 0.2, imp_ratio=0.0), evenly_spaced(100, 20))


def test_high_frame_score_gets_more_tokens() -> None:
    t, n = 8, 50
    frame = torch.zeros(t)
    frame[3] = 5.0
    keep = select_tokens(PolicyScores(torch.randn(t, n), frame), 0.2, imp_ratio=1.0)
    counts = torch.bincount(keep // n, minlength=t)
    assert counts[3] == counts.max() and counts[3] > counts[0]
    assert counts[3] <= math.ceil(1.5 * 80 / t)


@pytest.mark.parametrize("retention", [0.0, -0.5, 1.01, float("nan"), float("inf"), "0.5", True])
def test_bad_retention_names_value_and_range(retention: object) -> None:
    scores = PolicyScores(torch.randn(2, 4), torch.randn(2))
    with pytest.raises(ValueError, match=r"retention .* \(0, 1\]"):
        select_tokens(scores, retention)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retention"):
        budget(retention, 10)  # type: ignore[arg-type]


def test_budget_float_slack_and_minimum() -> None:
    assert budget(0.29, 100) == 29
    assert budget(0.1, 6272) == 627
    assert budget(1e-6, 100) == 1
    assert budget(1.0, 7) == 7


def test_non_finite_scores_raise() -> None:
    with pytest.raises(ValueError, match="token scores"):
        select_tokens(PolicyScores(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1)), 0.5)
    with pytest.raises(ValueError, match="imp_ratio"):
        select_tokens(PolicyScores(torch.zeros(1, 2), torch.zeros(1)), 0.5, imp_ratio=1.5)
