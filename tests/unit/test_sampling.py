"""Online combination-space sampling: budgets, determinism, band/frame caps, DPC-KNN against a brute force.

Agreement with the official outputs (exact DPC, capped probabilities, draw statistics) is in test_golden_*.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cacovid_rl.config import SamplingConfig
from cacovid_rl.policy.sampling import (
    ClipError,
    cap_probs,
    clip_max_probability,
    content_sample,
    dpc_knn_scores,
    frame_draw_weights,
    frame_samples,
    frame_samples_with_frames,
    frames_per_sample,
    num_bands,
    sample_combinations,
    token_samples,
    tokens_per_frame,
)
from cacovid_rl.types import MODE_CONTENT, MODE_FRAME, MODE_TOKEN, PolicyScores

FAST = settings(max_examples=12, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def per_frame_counts(keep: torch.Tensor, t: int, n: int) -> torch.Tensor:
    return torch.stack([torch.bincount(row // n, minlength=t) for row in keep])


def assert_valid_rows(keep: torch.Tensor, total: int) -> None:
    assert keep.dtype == torch.long
    assert (keep >= 0).all() and (keep < total).all()
    if keep.shape[1] > 1:
        assert (keep.diff(dim=1) > 0).all(), "rows must be strictly increasing (sorted, no duplicates)"


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "n", "k"),
    [(0.02, 196, 4), (0.01, 196, 2), (0.12, 196, 24), (1.0, 196, 196), (0.001, 196, 1), (0.5, 3, 2), (0.02, 10, 1)],
)
def test_tokens_per_frame(rate: float, n: int, k: int) -> None:
    assert tokens_per_frame(rate, n) == k


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_rate_is_named(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        tokens_per_frame(rate, 196)
    scores = PolicyScores(torch.zeros(2, 8), torch.zeros(2))
    with pytest.raises(ValueError, match=r"rate .* \(0, 1\]"):
        sample_combinations(scores, torch.randn(2, 8, 4), rate, SamplingConfig(), gen(0))


def test_num_bands_matches_method_and_keeps_k_per_band() -> None:
    assert num_bands(0.02, 2, 196, 4) == 25  # the official int(1 / 0.02 / 2)
    assert num_bands(0.12, 2, 196, 24) == 4
    assert num_bands(0.5, 2, 196, 98) == 1
    assert num_bands(0.02, 2, 10, 1) == 10  # limited to n // k (deviation: the official asserts num_group <= n)
    assert num_bands(0.2, 2, 9, 2) == 2  # official 2 bands of 5 and 4 tokens; both hold k = 2


@pytest.mark.parametrize(
    ("t", "ratio", "m"), [(32, 0.125, 4), (8, 0.125, 1), (25, 0.28, 8), (3, 0.125, 1), (5, 1.0, 5)]
)
def test_frames_per_sample_is_the_official_ceil(t: int, ratio: float, m: int) -> None:
    # 25 * 0.28 = 7.000000000000001: the official ceil gives 8.
    assert frames_per_sample(t, ratio) == m


# ---------------------------------------------------------------------------------------------------------------------
# probability capping


def test_cap_probs_hand_case() -> None:
    p = torch.tensor([0.7, 0.1, 0.1, 0.1])
    torch.testing.assert_close(cap_probs(p, 0.4), torch.tensor([0.4, 0.2, 0.2, 0.2]))


def test_cap_probs_cascades() -> None:
    # After capping the first entry, the second one exceeds the cap too.
    p = torch.tensor([0.5, 0.3, 0.1, 0.1])
    out = cap_probs(p, 0.3)
    torch.testing.assert_close(out, torch.tensor([0.3, 0.3, 0.2, 0.2]))


def test_cap_probs_is_the_official_recursion_row_by_row() -> None:
    torch.manual_seed(0)
    p = (torch.randn(5, 12) * 3).softmax(-1)
    rows = torch.stack([clip_max_probability(row, 0.2) for row in p])
    torch.testing.assert_close(cap_probs(p, 0.2), rows / rows.sum(-1, keepdim=True))


def test_clip_max_probability_treats_a_matrix_as_one_distribution() -> None:
    # Official quirk (frame mode): 2 rows, so the floor is 1/2^2 = 0.25 and the whole matrix is normalised; the
    # largest entry 0.7 / 2.9 = 0.24 is then under the cap 0.3 and nothing is capped.
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(2, 1)
    out = clip_max_probability(p, 0.3)
    torch.testing.assert_close(out, torch.tensor([[0.7, 0.25, 0.25, 0.25]]).repeat(2, 1) / 2.9)


def test_clip_max_probability_caps_a_whole_row_or_raises_like_the_official() -> None:
    # When the cap binds on column j, the official masks and overwrites ROW j of the matrix.
    p = torch.tensor([[0.01, 0.97, 0.01, 0.01]]).repeat(4, 1)
    out = clip_max_probability(p, 0.2)
    assert torch.equal(out[1], torch.full((4,), 0.2))
    assert not torch.equal(out[0], out[1])
    # Column 3 has no row 3: the official raises IndexError; the frame sampler falls back to the per-frame cap.
    with pytest.raises(ClipError, match="out of bounds"):
        clip_max_probability(torch.tensor([[0.01, 0.01, 0.01, 0.97]]).repeat(2, 1), 0.2)
    with pytest.raises(ClipError):
        clip_max_probability(torch.full((4,), 0.25), 0.2)  # a cap under 1/n cannot be met (official assert)


@FAST
@given(n=st.integers(2, 30), cap_mult=st.floats(1.05, 5.0), seed=st.integers(0, 1000))
def test_cap_probs_properties(n: int, cap_mult: float, seed: int) -> None:
    torch.manual_seed(seed)
    p = (torch.randn(3, n) * 3).softmax(-1)
    cap = min(cap_mult / n, 0.99)
    out = cap_probs(p, cap)
    torch.testing.assert_close(out.sum(-1), torch.ones(3))
    assert (out <= cap + 1e-5).all()
    assert (out >= 1.0 / n**2 * 0.5).all()
    # order preserved (weakly)
    order = p.argsort(-1, descending=True)
    assert (out.gather(-1, order).diff(dim=-1) <= 1e-6).all()


# ---------------------------------------------------------------------------------------------------------------------
# DPC-KNN


def brute_force_dpc(x: torch.Tensor, k: int) -> torch.Tensor:
    """Plain-Python DPC-KNN on one frame ``[M, D]`` (float64), the official definition spelled out."""
    m, d = x.shape
    x = x.double()
    dist = [[math.dist(x[i].tolist(), x[j].tolist()) / math.sqrt(d) for j in range(m)] for i in range(m)]
    density = []
    for i in range(m):
        nn = sorted(dist[i])[:k]  # the token itself (distance 0) is its own nearest neighbour
        density.append(math.exp(-sum(v * v for v in nn) / len(nn)))
    scores = []
    for i in range(m):
        denser = [dist[i][j] for j in range(m) if density[j] > density[i]]
        delta = min(denser) if denser else max(max(row) for row in dist)
        scores.append(density[i] * delta)
    return torch.tensor(scores, dtype=torch.float64)


def test_dpc_knn_matches_brute_force() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 9, 3)
    got = dpc_knn_scores(x, k=3)
    for f in range(2):
        torch.testing.assert_close(got[f].double(), brute_force_dpc(x[f], 3), rtol=1e-4, atol=1e-6)


def test_dpc_knn_prefers_cluster_centres_over_cluster_members() -> None:
    # Two tight clusters of 1-D points; each cluster's centre is a density peak with a large delta.
    pts = torch.tensor([0.0, 0.1, -0.1, 0.3, -0.3, 10.0, 10.1, 9.9, 10.3, 9.7])[None, :, None]
    scores = dpc_knn_scores(pts * 2, k=3)[0]
    top2 = set(scores.topk(2).indices.tolist())
    assert top2 == {0, 5}


def test_dpc_knn_is_float32_for_bf16_input() -> None:
    x = torch.randn(2, 6, 4).to(torch.bfloat16)
    assert dpc_knn_scores(x).dtype == torch.float32


def test_content_sample_is_per_frame_top_k() -> None:
    torch.manual_seed(1)
    t, n, k = 3, 12, 2
    feats = torch.randn(t, n, 5)
    keep = content_sample(feats, k, 4)
    assert keep.shape == (t * k,)
    assert_valid_rows(keep[None], t * n)
    scores = dpc_knn_scores(feats, 4)
    expected = (scores.topk(k, dim=-1).indices + torch.arange(t)[:, None] * n).reshape(-1).sort().values
    assert torch.equal(keep, expected)


# ---------------------------------------------------------------------------------------------------------------------
# token mode


@FAST
@given(
    t=st.integers(1, 4),
    n=st.integers(4, 60),
    rate=st.floats(0.01, 1.0),
    num_samples=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_token_samples_budget_order_and_top_k(t: int, n: int, rate: float, num_samples: int, seed: int) -> None:
    torch.manual_seed(seed)
    scores = torch.randn(t, n) * 2
    k = tokens_per_frame(rate, n)
    keep = token_samples(scores, k, num_samples, rate, 2, 2.0, gen(seed))
    assert keep.shape == (num_samples, t * k)
    assert_valid_rows(keep, t * n)
    assert (per_frame_counts(keep, t, n) == k).all()
    top = (scores.topk(k, dim=-1).indices + torch.arange(t)[:, None] * n).reshape(-1).sort().values
    assert torch.equal(keep[0], top)
    again = token_samples(scores, k, num_samples, rate, 2, 2.0, gen(seed))
    assert torch.equal(keep, again)


def test_token_samples_stay_inside_one_band() -> None:
    t, n, rate = 3, 40, 0.1  # k = 4, 5 bands of 8 ranks
    scores = torch.randn(t, n)
    k = tokens_per_frame(rate, n)
    keep = token_samples(scores, k, 50, rate, 2, 2.0, gen(3))
    rank = torch.empty(t, n, dtype=torch.long)
    rank.scatter_(1, scores.argsort(-1, descending=True), torch.arange(n).expand(t, n))
    band = (rank.reshape(-1)[keep] // 8).reshape(50, t, k)
    assert (band == band[..., :1]).all(), "all k tokens of a frame must come from the same band"


def test_token_samples_different_seeds_differ() -> None:
    scores = torch.randn(4, 50)
    a = token_samples(scores, 3, 8, 0.06, 2, 2.0, gen(1))
    b = token_samples(scores, 3, 8, 0.06, 2, 2.0, gen(2))
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[1:], b[1:])


def test_top_band_probability_is_capped() -> None:
    # Very peaked scores: uncapped, band 0 would hold ~all the mass; capped at max_group_prob / G = 2 / 5.
    n, rate = 40, 0.1
    scores = torch.linspace(20, 0, n)[None]
    keep = token_samples(scores, 4, 3001, rate, 2, 2.0, gen(0))[1:]
    top_band = (keep < 8).all(-1).float().mean().item()
    assert abs(top_band - 0.4) < 0.04
    # every other band is reachable
    bands = (keep // 8)[:, 0]
    assert set(bands.tolist()) == {0, 1, 2, 3, 4}


def test_in_band_probabilities_are_clamped() -> None:
    # rate 0.5 on 10 tokens -> a single band of e = 10 ranks; one dominant token. Its in-band probability is
    # clamped to 2/e = 0.2 and the others raised to 1/(2e) = 0.05, so after renormalising it is drawn first
    # with probability 0.2 / (0.2 + 9 * 0.05) ~= 0.31 (unclamped: ~1).
    n = 10
    scores = torch.tensor([[30.0] + [0.0] * (n - 1)])
    keep = token_samples(scores, 1, 2001, 0.5, 2, 2.0, gen(0))[1:]
    freq0 = (keep[:, 0] == 0).float().mean().item()
    assert abs(freq0 - 0.2 / 0.65) < 0.04


def test_token_scores_with_nan_raise() -> None:
    scores = torch.zeros(2, 8)
    scores[1, 3] = float("nan")
    with pytest.raises(ValueError, match="token scores"):
        token_samples(scores, 2, 3, 0.25, 2, 2.0, gen(0))


# ---------------------------------------------------------------------------------------------------------------------
# frame mode


def drawn_and_used(keep: torch.Tensor, drawn: torch.Tensor, n: int) -> torch.Tensor:
    """Frames holding a kept token, checking that they are all drawn frames."""
    used = per_frame_counts(keep, drawn.shape[1], n) > 0
    assert not (used & ~drawn).any(), "tokens may only come from drawn frames"
    return used


@FAST
@given(
    t=st.integers(2, 8),
    n=st.integers(2, 12),
    rate=st.floats(0.05, 1.0),
    frame_ratio=st.floats(0.1, 1.0),
    seed=st.integers(0, 10_000),
)
def test_frame_samples_exact_budget(t: int, n: int, rate: float, frame_ratio: float, seed: int) -> None:
    torch.manual_seed(seed)
    feats = torch.randn(t, n, 4)
    frame_scores = torch.randn(t)
    budget = t * tokens_per_frame(rate, n)
    keep, drawn = frame_samples_with_frames(frame_scores, feats, budget, 4, frame_ratio, 3, gen(seed))
    assert keep.shape == (4, budget) and drawn.shape == (4, t) and drawn.dtype == torch.bool
    assert_valid_rows(keep, t * n)
    m = max(math.ceil(t * frame_ratio), math.ceil(budget / n))  # the official count, extended when it cannot fit
    assert (drawn.sum(-1) == min(m, t)).all()
    drawn_and_used(keep, drawn, n)
    assert torch.equal(keep, frame_samples(frame_scores, feats, budget, 4, frame_ratio, 3, gen(seed)))


def test_frame_sample_zero_uses_top_frames() -> None:
    t, n = 8, 10
    frame_scores = torch.tensor([0.0, 5.0, 1.0, 4.0, -1.0, 0.5, 2.0, 3.0])
    keep, drawn = frame_samples_with_frames(frame_scores, torch.randn(t, n, 4), 8, 3, 0.25, 3, gen(0))
    assert drawn[0].nonzero().squeeze(1).tolist() == [1, 3]
    assert drawn.sum(-1).tolist() == [2, 2, 2]
    drawn_and_used(keep, drawn, n)


def test_frame_samples_spill_when_budget_exceeds_chosen_frames() -> None:
    # Deviation: 17 tokens do not fit in ceil(8 * 0.125) = 1 frame of 5 (the official torch.topk raises), so
    # ceil(17 / 5) = 4 frames are drawn.
    t, n = 8, 5
    keep, drawn = frame_samples_with_frames(torch.randn(t), torch.randn(t, n, 3), 17, 5, 0.125, 2, gen(0))
    assert keep.shape == (5, 17)
    assert_valid_rows(keep, t * n)
    assert (drawn.sum(-1) == 4).all()
    drawn_and_used(keep, drawn, n)


def test_a_drawn_frame_can_get_no_token() -> None:
    # Official: one DPC-KNN over the union of the drawn frames, no token forced per frame (golden frame_15/16 show
    # it at realistic budgets). Smallest case: 1 token for 2 drawn frames; both still count as drawn.
    t, n = 2, 6
    keep, drawn = frame_samples_with_frames(torch.zeros(t), torch.randn(t, n, 3), 1, 3, 1.0, 4, gen(0))
    assert drawn.all()
    assert ((per_frame_counts(keep, t, n) > 0).sum(-1) == 1).all()


def test_frame_draws_follow_the_official_weights() -> None:
    # 2 of 16 frames per sample. Frame 0 has softmax mass ~0.59. Official: the 3/t cap is applied to the repeated
    # [8, 16] matrix and never binds, so frame 0 is drawn in ~83% of the samples (floor 1/64 for frame 1).
    # per_frame: capped at 3/t = 0.1875 (the excess spread over the others), its inclusion is ~35%.
    t, n = 16, 8
    scores = torch.zeros(t)
    scores[0], scores[1] = 3.0, -3.0
    feats = torch.randn(t, n, 3)
    expected = {"official": (0.75, 0.9), "per_frame": (0.27, 0.45)}
    for cap, (lo, hi) in expected.items():
        _, drawn = frame_samples_with_frames(scores, feats, t, 1001, 0.125, 2, gen(0), frame_cap=cap)
        drawn = drawn[1:]
        assert (drawn.sum(-1) == 2).all()
        assert lo < drawn[:, 0].float().mean() < hi, cap
        assert drawn[:, 1].float().mean() < 0.06
        assert drawn[:, 2:].float().mean() > 0.02


def test_frame_draw_weights_official_vs_per_frame() -> None:
    scores = torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    official = frame_draw_weights(scores, 8)
    soft = scores.softmax(-1).clamp(min=1 / 64)
    torch.testing.assert_close(official, (soft / soft.sum()).expand(8, -1))  # max(softmax, 1/64), renormalised
    per_frame = frame_draw_weights(scores, 8, "per_frame")
    assert float(per_frame[0, 0]) == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="frame_cap"):
        frame_draw_weights(scores, 8, "capped")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# all modes


def test_sample_combinations_layout() -> None:
    t, n = 4, 20
    cfg = SamplingConfig(num_content=1, num_token=5, num_frame=3, frame_ratio=0.5)
    scores = PolicyScores(torch.randn(t, n, requires_grad=True), torch.randn(t, requires_grad=True))
    feats = torch.randn(t, n, 6)
    combos = sample_combinations(scores, feats, 0.1, cfg, gen(0))
    assert combos.keep.shape == (9, t * 2)
    assert combos.mode.tolist() == [MODE_CONTENT] + [MODE_TOKEN] * 5 + [MODE_FRAME] * 3
    assert combos.rate == 0.1
    assert_valid_rows(combos.keep, t * n)
    assert torch.equal(combos.keep[0], content_sample(feats, 2, cfg.knn_k))
    assert (per_frame_counts(combos.keep[:6], t, n) == 2).all()
    assert combos.frame_mask is not None and combos.frame_mask.shape == (9, t)
    assert combos.frame_mask.dtype == torch.bool
    assert combos.frame_mask[:6].all()  # content and token rows keep tokens in every frame
    assert (combos.frame_mask[6:].sum(-1) == 2).all()  # frame rows: the ceil(4 * 0.5) drawn frames
    drawn_and_used(combos.keep[6:], combos.frame_mask[6:], n)
    again = sample_combinations(scores, feats, 0.1, cfg, gen(0))
    assert torch.equal(combos.keep, again.keep)
    assert torch.equal(combos.frame_mask, again.frame_mask)
    other = sample_combinations(scores, feats, 0.1, cfg, gen(1))
    assert not torch.equal(combos.keep, other.keep)


def test_sample_combinations_passes_the_frame_cap() -> None:
    t, n = 16, 8  # rate 0.125 -> k = 1, budget 16 = 2 frames of 8: the official 2 draws, no extension
    scores = PolicyScores(torch.randn(t, n), torch.tensor([6.0] + [0.0] * (t - 1)))
    feats = torch.randn(t, n, 3)
    freq = {}
    for cap in ("official", "per_frame"):
        cfg = SamplingConfig(num_content=1, num_token=1, num_frame=400, frame_cap=cap)
        mask = sample_combinations(scores, feats, 0.125, cfg, gen(0)).frame_mask
        freq[cap] = mask[3:, 0].float().mean().item()
    assert freq["official"] > 0.9 and freq["per_frame"] < 0.5


def test_sample_combinations_default_recipe_shapes() -> None:
    t, n = 32, 196
    combos = sample_combinations(
        PolicyScores(torch.randn(t, n), torch.randn(t)), torch.randn(t, n, 16), 0.02, SamplingConfig(), gen(0)
    )
    assert combos.keep.shape == (32, 128)
    assert combos.frame_mask is not None
    assert (combos.frame_mask[24:].sum(-1) == 4).all()
    drawn_and_used(combos.keep[24:], combos.frame_mask[24:], n)


@pytest.mark.parametrize("which", ["token scores", "frame scores", "video features"])
def test_non_finite_inputs_are_named(which: str) -> None:
    t, n = 2, 8
    token, frame, feats = torch.zeros(t, n), torch.zeros(t), torch.randn(t, n, 3)
    {"token scores": token, "frame scores": frame, "video features": feats}[which].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=which):
        sample_combinations(PolicyScores(token, frame), feats, 0.25, SamplingConfig(), gen(0))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        scores = PolicyScores(torch.zeros(2, 8), torch.zeros(3))
        sample_combinations(scores, torch.randn(2, 8, 3), 0.25, SamplingConfig())
