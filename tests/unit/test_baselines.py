"""Training-free selectors: the shared contract, plus each method's defining behaviour on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cacovid_rl.baselines import SELECTORS, SelectionContext, TokenSelector, budget, get_selector
from cacovid_rl.baselines.divprune import divprune_order
from cacovid_rl.baselines.visionzip import VisionZipSelector, frame_shares
from cacovid_rl.policy import selection
from cacovid_rl.types import EncodedQuestion, PolicyScores


class FakeAdapter:
    """Stands in for a model adapter: returns a fixed attention vector and records the calls."""

    def __init__(self, attention: torch.Tensor) -> None:
        self.attention = attention
        self.calls: list[int] = []

    def early_layer_attention(self, enc: EncodedQuestion, layer: int = 2) -> torch.Tensor:
        self.calls.append(layer)
        return self.attention


def make_enc(video: torch.Tensor, lead: int = 3, tail: int = 4) -> EncodedQuestion:
    """An EncodedQuestion whose video block (``[T, N, D]``) sits between random text embeddings."""
    t, n, d = video.shape
    embeds = torch.cat([torch.randn(lead, d), video.reshape(t * n, d), torch.randn(tail, d)])
    return EncodedQuestion(embeds, torch.arange(embeds.shape[0]), lead, t, n)


def make_ctx(t: int = 4, n: int = 10, d: int = 8, seed: int = 0) -> SelectionContext:
    torch.manual_seed(seed)
    enc = make_enc(torch.randn(t, n, d))
    return SelectionContext(
        enc=enc,
        adapter=FakeAdapter(torch.rand(t * n)),
        scores=PolicyScores(torch.randn(t, n), torch.randn(t)),
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------------------------------------------------------------
# the shared contract


def test_budget_is_the_selection_budget() -> None:
    assert budget is selection.budget


@settings(max_examples=30, deadline=None)
@example(name="cacovid", t=1, n=2, retention=0.9999999999999999, seed=0)
@example(name="uniform", t=1, n=2, retention=0.9999999999999999, seed=0)
@given(
    name=st.sampled_from(SELECTORS),
    t=st.integers(1, 5),
    n=st.integers(1, 20),
    retention=st.floats(0.001, 1.0),
    seed=st.integers(0, 1000),
)
def test_every_selector_keeps_exact_budget(name: str, t: int, n: int, retention: float, seed: int) -> None:
    ctx = make_ctx(t, n, 6, seed)
    selector = get_selector(name)
    keep = selector.select(ctx, retention)
    assert keep.dtype == torch.long
    expected = budget(retention, t * n)
    if name == "cacovid":
        # The official expression floor(r * T * h * w) (policy/selection.py), without budget()'s 1e-9 slack: one token
        # fewer where r * T * N falls an ulp short of an integer (r = 0.9999999999999999 of 2 tokens keeps 1).
        h, w = selection.default_grid(n)
        expected = max(1, math.floor(retention * t * h * w))
    assert keep.shape == (expected,)
    assert (keep >= 0).all() and (keep < t * n).all()
    assert keep.numel() == 1 or (keep.diff() > 0).all(), "sorted and distinct"


@pytest.mark.parametrize("name", SELECTORS)
def test_selectors_follow_protocol_and_validate_retention(name: str) -> None:
    selector = get_selector(name)
    assert isinstance(selector, TokenSelector)
    assert selector.name == name
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="retention"):
            selector.select(make_ctx(), bad)


def test_unknown_selector() -> None:
    with pytest.raises(ValueError, match=r"unknown selector 'pdrop'.*uniform"):
        get_selector("pdrop")


# ---------------------------------------------------------------------------------------------------------------------
# uniform / random


def test_uniform_is_evenly_spaced() -> None:
    ctx = make_ctx(t=2, n=5)
    assert get_selector("uniform").select(ctx, 0.4).tolist() == [0, 3, 6, 9]
    assert get_selector("uniform").select(ctx, 1.0).tolist() == list(range(10))


def test_random_is_seeded() -> None:
    ctx = make_ctx(t=4, n=25)
    sel = get_selector("random")
    a = sel.select(SelectionContext(ctx.enc, generator=torch.Generator().manual_seed(5)), 0.2)
    b = sel.select(SelectionContext(ctx.enc, generator=torch.Generator().manual_seed(5)), 0.2)
    c = sel.select(SelectionContext(ctx.enc, generator=torch.Generator().manual_seed(6)), 0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # without a generator a fixed default seed keeps evaluation reproducible
    assert torch.equal(sel.select(SelectionContext(ctx.enc), 0.2), sel.select(SelectionContext(ctx.enc), 0.2))


# ---------------------------------------------------------------------------------------------------------------------
# FastV


def test_fastv_keeps_most_attended_tokens_at_layer_2() -> None:
    ctx = make_ctx(t=2, n=4)
    attention = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.0, 0.9, 0.2, 0.01])
    adapter = FakeAdapter(attention)
    keep = get_selector("fastv").select(SelectionContext(ctx.enc, adapter=adapter), 0.375)  # B = 3
    assert keep.tolist() == [1, 3, 5]
    assert adapter.calls == [2]


def test_fastv_errors() -> None:
    ctx = make_ctx(t=2, n=4)
    with pytest.raises(ValueError, match="early_layer_attention"):
        get_selector("fastv").select(SelectionContext(ctx.enc), 0.5)
    with pytest.raises(ValueError, match="returned 3 values for 8"):
        get_selector("fastv").select(SelectionContext(ctx.enc, adapter=FakeAdapter(torch.ones(3))), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        get_selector("fastv").select(SelectionContext(ctx.enc, adapter=FakeAdapter(torch.full((8,), math.nan))), 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# VisionZip


def test_frame_shares() -> None:
    assert frame_shares(10, 4).tolist() == [3, 2, 2, 3]
    assert frame_shares(8, 4).tolist() == [2, 2, 2, 2]
    assert frame_shares(3, 4).sum() == 3


def test_visionzip_dominant_split_54_to_10() -> None:
    t, n, d = 2, 100, 8
    torch.manual_seed(0)
    video = torch.randn(t, n, d) * 0.1
    salient = torch.stack([torch.randperm(n)[:54] for _ in range(t)])
    for f in range(t):
        video[f, salient[f]] *= 100.0  # high-norm tokens
    keep = get_selector("visionzip").select(SelectionContext(make_enc(video)), 128 / (t * n))  # 64 per frame
    for f in range(t):
        in_frame = set((keep[keep // n == f] % n).tolist())
        assert set(salient[f].tolist()) <= in_frame, "all dominant (high-norm) tokens kept"
        assert len(in_frame) == 64  # 54 dominant + 10 contextual


def test_visionzip_contextual_representatives() -> None:
    # One frame of 8 tokens, 3 kept with a 1:2 split: token 0 is dominant (norm 10). The rest form two
    # directions: A = {1, 2, 3} around e1, B = {4, 5, 6, 7} around e2. Targets are evenly spaced over the
    # 7 remaining tokens -> tokens 1 and 7, one in each cluster. Each cluster keeps the member closest to its
    # mean: token 2 (exactly e1) and token 5 (exactly e2).
    e = torch.eye(6)
    video = torch.stack(
        [
            10 * e[5],
            e[0] + 0.3 * e[2],
            e[0],
            e[0] - 0.3 * e[2],
            e[1] + 0.3 * e[2],
            e[1],
            e[1] - 0.3 * e[2],
            e[1] + 0.1 * e[3],
        ]
    )[None]
    keep = VisionZipSelector(dominant=1, contextual=2).select(SelectionContext(make_enc(video)), 3 / 8)
    assert keep.tolist() == [0, 2, 5]


# ---------------------------------------------------------------------------------------------------------------------
# DivPrune


def brute_force_divprune(x: torch.Tensor, count: int) -> list[int]:
    """The greedy max-min procedure with plain Python loops on a dense cosine-distance table."""
    v = [row / row.norm() for row in x.double()]
    m = len(v)
    dist = [[1.0 - float(v[i] @ v[j]) for j in range(m)] for i in range(m)]
    first = max(range(m), key=lambda i: min(dist[i][j] for j in range(m) if j != i))
    chosen = [first]
    while len(chosen) < count:
        rest = [i for i in range(m) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(dist[i][j] for j in chosen)))
    return chosen


def test_divprune_matches_brute_force() -> None:
    torch.manual_seed(3)
    x = torch.randn(15, 5)
    assert divprune_order(x, 6).tolist() == brute_force_divprune(x, 6)


def test_divprune_spreads_over_clusters() -> None:
    # Three tight clusters of 5 near-duplicate tokens each: 3 kept tokens must come from 3 different clusters.
    torch.manual_seed(0)
    centres = torch.eye(3) * 5
    x = (centres[:, None, :] + 0.01 * torch.randn(3, 5, 3)).reshape(1, 15, 3)
    keep = get_selector("divprune").select(SelectionContext(make_enc(x)), 3 / 15)
    assert sorted((keep // 5).tolist()) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# CaCoVID


def _golden_selection_cases(**match) -> list[dict]:
    from tests.golden_io import load_golden

    cases = load_golden("eval_selection")["cases"]
    return [c for c in cases if all(c[k] == v for k, v in match.items()) and not c["diag_rank_tie_at_quota_boundary"]]


def test_cacovid_selector_keeps_what_the_official_code_keeps() -> None:
    """The selector on the official code's inputs keeps the official code's tokens (golden data: independent of
    ``select_tokens``), with its own imp_ratio and its 1.5 x retention per-frame cap."""
    from tests.golden_io import blob

    cases = [
        c
        for c in _golden_selection_cases(N=16)
        if c["max_sample_ratio_for_each_frame"] == pytest.approx(1.5 * c["retention"])
    ]
    assert {c["imp_ratio"] for c in cases} == {0.5, 1.0} and len(cases) >= 20
    for c in cases:
        scores = PolicyScores(torch.from_numpy(blob(c["token_scores"])), torch.from_numpy(blob(c["frame_scores"])))
        enc = make_enc(torch.zeros(c["T"], c["N"], 8))
        keep = get_selector("cacovid", imp_ratio=c["imp_ratio"]).select(
            SelectionContext(enc, scores=scores), c["retention"]
        )
        assert keep.tolist() == c["official_kept"], c["id"]
    ctx = make_ctx(t=4, n=10)
    with pytest.raises(ValueError, match="needs policy scores"):
        get_selector("cacovid").select(SelectionContext(ctx.enc), 0.3)
    wrong = SelectionContext(ctx.enc, scores=PolicyScores(torch.zeros(2, 10), torch.zeros(2)))
    with pytest.raises(ValueError, match="do not match"):
        get_selector("cacovid").select(wrong, 0.3)
