"""Training samplers against the official CaCoVID outputs (tests/golden/sampling.json).

Deterministic fields to 1e-6; draw statistics with our own seeded 20,000 draws per setting: |z| <= 5 per
frequency and a chi-square p >= 1e-3 for band and pair counts (the golden README's tolerance).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cacovid_rl.policy.sampling import (
    band_cap,
    band_probabilities,
    band_sizes,
    cap_probs,
    clip_max_probability,
    draw_frames,
    frame_draw_weights,
    frames_per_sample,
    num_bands,
    token_samples,
    tokens_per_frame,
)
from tests.golden_io import blob, load_golden

GOLDEN = load_golden("sampling")
TOKEN = GOLDEN["token_mode"]
FRAME = [c for c in GOLDEN["frame_mode"] if "official_error" not in c]
FRAME_ERROR = [c for c in GOLDEN["frame_mode"] if "official_error" in c]
CLIP = GOLDEN["clip_max_probability"]
N_DRAWS = 20_000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def max_z(ours: np.ndarray, n: int, theirs: np.ndarray, m: int) -> float:
    """Largest two-sample z of frequencies ``ours / n`` vs ``theirs / m`` (entries never seen by either: z = 0)."""
    f, g = ours / n, theirs / m
    q = (ours + theirs) / (n + m)
    var = q * (1 - q) * (1 / n + 1 / m)
    z = np.where(var > 0, np.abs(f - g) / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
    return float(z.max())


def chi2_two_sample_p(ours: np.ndarray, theirs: np.ndarray, min_count: int = 10) -> float:
    """p-value of a 2 x K contingency chi-square (homogeneity); columns with under ``min_count`` in all are pooled."""
    ours, theirs = np.asarray(ours, float), np.asarray(theirs, float)
    small = (ours + theirs) < min_count
    cols = [np.append(a[~small], a[small].sum()) if small.any() else a for a in (ours, theirs)]
    table = np.stack(cols)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    df = table.shape[1] - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def test_golden_files_are_complete() -> None:
    assert (len(TOKEN), len(FRAME), len(FRAME_ERROR), len(CLIP)) == (10, 10, 1, 26)


# ----------------------------------------------------------------------------------------------------------------------
# clip_max_probability


@pytest.mark.parametrize("case", CLIP, ids=[f"clip{i:02d}" for i in range(len(CLIP))])
def test_clip_max_probability_matches_official(case: dict) -> None:
    p = torch.from_numpy(blob(case["p"]))
    out = clip_max_probability(p, case["max_prob"])
    np.testing.assert_allclose(out.numpy(), blob(case["official_output"]), atol=1e-6, rtol=0)
    renorm = blob(case["official_output_renormalised"])
    np.testing.assert_allclose((out / out.sum()).numpy(), renorm, atol=1e-6, rtol=0)  # one flat distribution
    if p.dim() == 1:  # the vectorised row version used by the token sampler
        np.testing.assert_allclose(cap_probs(p, case["max_prob"]).numpy(), renorm, atol=1e-6, rtol=0)
        np.testing.assert_allclose(cap_probs(p[None].repeat(3, 1), case["max_prob"])[2].numpy(), renorm, atol=1e-6)


def test_plain_water_filling_without_the_re_applied_floor_would_fail() -> None:
    # Flooring only once (then water-filling) differs from the official at some golden case: the test can fail.
    worst = 0.0
    for case in CLIP:
        p = torch.from_numpy(blob(case["p"]))
        if p.dim() != 1 or p.numel() < 2:
            continue
        q = p.clamp(min=1 / p.numel() ** 2)
        q = q / q.sum()
        cap = min(case["max_prob"], 0.999)
        capped = torch.zeros_like(q, dtype=torch.bool)
        for _ in range(q.numel()):
            free = (1 - cap * capped.sum()) / q[~capped].sum()
            new = torch.where(capped, torch.full_like(q, cap), q * free)
            if torch.equal(new > cap + 1e-7, torch.zeros_like(capped)):
                break
            capped |= new > cap + 1e-7
        worst = max(worst, float((new - torch.from_numpy(blob(case["official_output_renormalised"]))).abs().max()))
    assert worst > 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# token mode


@pytest.mark.parametrize("case", TOKEN, ids=[c["id"] for c in TOKEN])
def test_token_mode_deterministic_fields(case: dict) -> None:
    scores = torch.from_numpy(blob(case["scores"]))
    rate, n = case["max_sample_rate"], case["N"]
    k = tokens_per_frame(rate, n)
    g = num_bands(rate, 2, n, k)
    assert (k, g) == (case["k"], case["num_group"])
    assert band_cap(g, 2.0) == pytest.approx(case["max_prob_for_each_group"], abs=1e-12)
    assert band_sizes(n, g) == case["band_sizes"]
    assert scores.softmax(-1).argsort(descending=True, stable=True).tolist() == case["official_rank_order"]
    probs = band_probabilities(scores[None], g, 2.0)[0].numpy()
    np.testing.assert_allclose(probs, blob(case["official_capped_band_probs"]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", TOKEN, ids=[c["id"] for c in TOKEN])
def test_token_mode_statistics(case: dict) -> None:
    scores = torch.from_numpy(blob(case["scores"]))[None]
    rate, n, k, g = case["max_sample_rate"], case["N"], case["k"], case["num_group"]
    keep = token_samples(scores, k, N_DRAWS + 1, rate, 2, 2.0, gen(case["draw_seed"] + 1))
    top = scores[0].topk(k).indices.sort().values
    assert torch.equal(keep[0], top), "row 0 is the top-k"
    rows = keep[1:]
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.tensor(case["official_rank_order"])] = torch.arange(n)
    band_of_rank = torch.repeat_interleave(torch.arange(g), torch.tensor(case["band_sizes"]))
    bands = band_of_rank[rank[rows]]
    assert (bands == bands[:, :1]).all(), "every row draws its k tokens from one band"
    inclusion = torch.bincount(rows.reshape(-1), minlength=n).numpy()
    band_counts = torch.bincount(bands[:, 0], minlength=g).numpy()
    draws = case["draws"]
    assert max_z(inclusion, N_DRAWS, np.array(case["official_inclusion_counts"]), draws) <= 5
    assert max_z(band_counts, N_DRAWS, np.array(case["official_band_counts"]), draws) <= 5
    assert chi2_two_sample_p(band_counts, case["official_band_counts"]) >= 1e-3


def test_token_07_low_mass_bands_are_sampled_almost_uniformly() -> None:
    # The official +1e-8 in the in-band normalisation: a band with < 1e-8 of the mass is drawn near-uniformly.
    case = next(c for c in TOKEN if c["id"] == "token_07")
    scores = torch.from_numpy(blob(case["scores"]))
    order = torch.tensor(case["official_rank_order"])
    last_band = order[-case["band_sizes"][-1] :]
    assert float(scores.softmax(-1)[last_band].sum()) < 1e-8
    inclusion = np.array(case["official_inclusion_counts"])[last_band.numpy()]
    assert inclusion.max() < 1.5 * inclusion.min()


# ----------------------------------------------------------------------------------------------------------------------
# frame mode


def frame_stats(case: dict, n_draws: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Our drawn frames in calls of 8 rows as the official (rows 1..7 counted): inclusion counts, pair counts."""
    scores = torch.from_numpy(blob(case["frame_scores"]))
    t, m = case["T"], case["num_frames_drawn"]
    weights = frame_draw_weights(scores, 8)[1:]  # the rows an official call uses for samples 1..7
    calls = math.ceil(n_draws / 7)
    drawn = torch.multinomial(weights.repeat(calls, 1), m, replacement=False, generator=gen(case["draw_seed"] + 1))
    drawn = drawn[:n_draws]
    inclusion = torch.bincount(drawn.reshape(-1), minlength=t).numpy()
    pairs = np.zeros((t, t), dtype=np.int64)
    if m == 2:
        lo, hi = drawn.min(-1).values, drawn.max(-1).values
        np.add.at(pairs, (lo.numpy(), hi.numpy()), 1)
    return inclusion, pairs, drawn


@pytest.mark.parametrize("case", FRAME, ids=[c["id"] for c in FRAME])
def test_frame_mode_deterministic_fields(case: dict) -> None:
    scores = torch.from_numpy(blob(case["frame_scores"]))
    assert frames_per_sample(case["T"], case["frame_ratio"]) == case["num_frames_drawn"]
    weights = frame_draw_weights(scores, 8)
    np.testing.assert_allclose(weights.numpy(), blob(case["official_draw_weights"]), atol=1e-6, rtol=0)
    assert bool((weights == weights[0]).all()) == case["weights_rows_equal"]
    # draw_frames: row 0 the top frames, rows 1..7 drawn from weight rows 1..7 with the caller's generator.
    m = case["num_frames_drawn"]
    rows = draw_frames(scores, m, 8, "official", gen(7))
    assert rows[0].tolist() == sorted(scores.topk(m).indices.tolist())
    expected = torch.multinomial(weights[1:], m, replacement=False, generator=gen(7)).sort(-1).values
    assert torch.equal(rows[1:], expected)


@pytest.mark.parametrize("case", FRAME, ids=[c["id"] for c in FRAME])
def test_frame_mode_statistics(case: dict) -> None:
    inclusion, pairs, drawn = frame_stats(case, N_DRAWS)
    draws = case["draws"]
    assert max_z(inclusion, N_DRAWS, np.array(case["official_inclusion_counts"]), draws) <= 5
    if case.get("official_pair_counts"):
        theirs = np.zeros_like(pairs)
        for i, j, c in case["official_pair_counts"]:
            theirs[min(i, j), max(i, j)] += c
        iu = np.triu_indices(case["T"], 1)
        assert max_z(pairs[iu], N_DRAWS, theirs[iu], draws) <= 5
        assert chi2_two_sample_p(pairs[iu], theirs[iu]) >= 1e-3
    if case.get("official_inclusion_counts_by_row"):
        for row, counts in case["official_inclusion_counts_by_row"].items():
            ours = drawn[int(row) - 1 :: 7]  # our row r of every call
            mine = torch.bincount(ours.reshape(-1), minlength=case["T"]).numpy()
            assert max_z(mine, ours.shape[0], np.array(counts), case["draws_by_row"][row]) <= 5


def test_frame_mode_is_not_capped_at_3_over_t_for_32_frames() -> None:
    # frame_06 (dominant frame, T=32): the official draws it far more often than a 3/T cap would allow.
    case = next(c for c in FRAME if c["id"] == "frame_06")
    scores = torch.from_numpy(blob(case["frame_scores"]))
    dominant = case["dominant_frame"]
    official = frame_draw_weights(scores, 8, "official")[1, dominant]
    per_frame = frame_draw_weights(scores, 8, "per_frame")[1, dominant]
    assert per_frame <= 3 / 32 + 1e-6 < official
    freq = case["official_inclusion_counts"][dominant] / case["draws"]
    assert freq > 1.5 * (1 - (1 - 3 / 32) ** 4)  # above what the per-frame cap allows for 4 draws


def test_frame_10_official_index_error_falls_back_to_the_per_frame_cap() -> None:
    case = FRAME_ERROR[0]
    assert case["official_error"].startswith("IndexError")
    scores = torch.from_numpy(blob(case["frame_scores"]))
    weights = frame_draw_weights(scores, 8, "official")
    torch.testing.assert_close(weights, frame_draw_weights(scores, 8, "per_frame"))
    assert float(weights.max()) <= 3 / case["T"] + 1e-6
    m = frames_per_sample(case["T"], case["frame_ratio"])
    rows = draw_frames(scores, m, 8, "official", gen(0))
    assert rows.shape == (8, m) and (rows.diff(dim=-1) > 0).all()
