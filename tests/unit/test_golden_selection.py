"""Evaluation-time selection and DPC-KNN against the official CaCoVID outputs (tests/golden, exact)."""

from __future__ import annotations

import math

import pytest
import torch

from cacovid_rl.policy.sampling import _dpc_over_frames, content_sample
from cacovid_rl.policy.selection import frame_weights, select_tokens, select_tokens_detailed
from cacovid_rl.types import PolicyScores
from tests.golden_io import blob, load_golden

EVAL = load_golden("eval_selection")["cases"]
DPC = load_golden("dpc")
QUIRK_CAP_ZERO = ["eval_000", "eval_020", "eval_040", "eval_060", "eval_091"]
QUIRK_OVERSHOOT = ["eval_001", "eval_002", "eval_021", "eval_022", "eval_041", "eval_042", "eval_061", "eval_062"]


def eval_scores(case: dict) -> PolicyScores:
    return PolicyScores(torch.from_numpy(blob(case["token_scores"])), torch.from_numpy(blob(case["frame_scores"])))


def test_golden_files_are_complete() -> None:
    assert len(EVAL) == 96
    assert len(DPC["content_cases"]) == 24 and len(DPC["frame_cases"]) == 17


@pytest.mark.parametrize("case", EVAL, ids=[c["id"] for c in EVAL])
def test_eval_selection_matches_official(case: dict) -> None:
    sel = select_tokens_detailed(
        eval_scores(case),
        case["retention"],
        case["imp_ratio"],
        case["max_sample_ratio_for_each_frame"],
        tuple(case["grid_hw"]),
    )
    assert sel.quotas == case["official_importance_quotas"]
    assert sel.importance.tolist() == case["official_importance_kept"]
    assert sel.num_coverage == case["official_num_coverage"]
    assert sel.keep.tolist() == case["official_kept"]
    assert len(case["official_kept"]) == math.floor(case["retention"] * case["T"] * case["N"])


def test_eval_defaults_are_the_official_evaluation_defaults() -> None:
    # eval_000..eval_079 use the official evaluation default max_ratio = 1.5 * retention (stored rounded).
    default_cases = EVAL[:80]
    assert all(math.isclose(c["max_sample_ratio_for_each_frame"], 1.5 * c["retention"]) for c in default_cases)
    for case in default_cases:
        keep = select_tokens(eval_scores(case), case["retention"], case["imp_ratio"])
        assert keep.tolist() == case["official_kept"], case["id"]


def test_official_quota_quirks_are_present() -> None:
    by_id = {c["id"]: c for c in EVAL}
    for cid in QUIRK_CAP_ZERO:  # cap 0: the whole importance budget is handed out from frame 0 on
        quotas = by_id[cid]["official_importance_quotas"]
        assert quotas == sorted(quotas, reverse=True) and quotas[-1] <= quotas[0] <= quotas[-1] + 1
    for cid in QUIRK_OVERSHOOT:
        assert 0 in by_id[cid]["official_importance_quotas"]


def largest_remainder_quotas(weights: torch.Tensor, total: int, cap: int) -> list[int]:
    """A plausible but non-official quota rule: floor, then leftovers to the largest remainders."""
    target = weights.double() * total
    q = target.clamp(max=cap).floor().long()
    for i in (target - q).argsort(descending=True, stable=True)[: total - int(q.sum())].tolist():
        q[i] += 1
    return q.tolist()


def test_largest_remainder_rule_would_fail_the_golden_data() -> None:
    # The golden quotas must be able to tell quota rules apart; otherwise the exact tests above prove little.
    mismatches = 0
    for case in EVAL:
        r, imp, mr = case["retention"], case["imp_ratio"], case["max_sample_ratio_for_each_frame"]
        h, w = case["grid_hw"]
        weights = frame_weights(torch.from_numpy(blob(case["frame_scores"])), r, mr)
        total = math.floor(imp * r * h * w * case["T"])
        alt = largest_remainder_quotas(weights, total, max(int(imp * h * w * mr), 1))
        mismatches += alt != case["official_importance_quotas"]
    assert mismatches >= 10


@pytest.mark.parametrize("case", DPC["content_cases"], ids=[c["id"] for c in DPC["content_cases"]])
def test_content_dpc_matches_official(case: dict) -> None:
    feats = torch.from_numpy(blob(case["features"]))
    assert content_sample(feats, case["k_per_frame"]).tolist() == case["official_kept"]


@pytest.mark.parametrize("case", DPC["frame_cases"], ids=[c["id"] for c in DPC["frame_cases"]])
def test_frame_dpc_matches_official(case: dict) -> None:
    t, n, d = case["T"], case["N"], case["D"]
    chosen = torch.tensor(case["chosen_frames"])
    feats = torch.randn(t, n, d, generator=torch.Generator().manual_seed(0))  # the other frames are never read
    feats[chosen] = torch.from_numpy(blob(case["features_of_chosen_frames"]))
    kept = _dpc_over_frames(feats, chosen.sort().values[None], case["budget"], 4)[0]
    assert kept.tolist() == case["official_kept"]
    per_frame = [int((kept // n == f).sum()) for f in case["chosen_frames"]]
    assert per_frame == case["official_kept_per_chosen_frame"]
    assert (0 in per_frame) == case["official_leaves_a_chosen_frame_empty"]


def test_frame_dpc_with_self_excluded_neighbours_would_fail() -> None:
    # Excluding the token itself from its 4 nearest neighbours (a common DPC-KNN variant) changes golden results.
    changed = 0
    for case in DPC["content_cases"]:
        x = torch.from_numpy(blob(case["features"])).float()
        dist = torch.stack([torch.cdist(f, f) for f in x]) / x.shape[-1] ** 0.5
        eye = torch.eye(x.shape[1], dtype=torch.bool)
        dens = (-(dist.masked_fill(eye, math.inf).topk(4, largest=False).values ** 2).mean(-1)).exp()
        denser = dens[:, None, :] > dens[:, :, None]
        delta = torch.where(denser, dist, dist.amax(dim=(-1, -2))[:, None, None]).amin(-1)
        top = (delta * dens).topk(case["k_per_frame"], dim=-1).indices
        kept = (top + torch.arange(x.shape[0])[:, None] * x.shape[1]).reshape(-1).sort().values
        changed += kept.tolist() != case["official_kept"]
    assert changed >= 3
