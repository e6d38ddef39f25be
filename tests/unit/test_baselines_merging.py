"""The 2025-26 baselines on hand-made inputs: each method's defining behaviour (as its paper describes it), the
exact budget of every method in the package, and the helpers they share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cacovid_rl.baselines import METHODS, SelectionContext, budget, compress, get_method
from cacovid_rl.baselines.common import allocate, dpc_knn
from cacovid_rl.baselines.fastvid import FastVIDCompressor, dyseg
from cacovid_rl.baselines.flashvid import FlashVIDCompressor, adts, dyseg_min_segments, tree_roots
from cacovid_rl.baselines.framefusion import FrameFusionCompressor
from cacovid_rl.baselines.prunevid import PruneVidCompressor, temporal_segments
from cacovid_rl.baselines.vidcom2 import VidCom2Selector
from cacovid_rl.types import EncodedQuestion, PolicyScores


class FakeAdapter:
    def __init__(self, attention: torch.Tensor) -> None:
        self.attention = attention
        self.calls: list[int] = []

    def early_layer_attention(self, enc: EncodedQuestion, layer: int = 2) -> torch.Tensor:
        self.calls.append(layer)
        return self.attention


def make_enc(video: torch.Tensor, mrope: bool = False) -> EncodedQuestion:
    t, n, d = video.shape
    embeds = torch.cat([torch.randn(3, d), video.reshape(t * n, d), torch.randn(4, d)])
    pos = torch.arange(embeds.shape[0]) * 3 + 1
    if mrope:
        pos = torch.stack([pos, pos // 2, pos % 7])
    return EncodedQuestion(embeds, pos, 3, t, n)


def ctx_of(video: torch.Tensor, attention: torch.Tensor | None = None, mrope: bool = False) -> SelectionContext:
    t, n, _ = video.shape
    attn = attention if attention is not None else torch.rand(t * n)
    return SelectionContext(
        enc=make_enc(video, mrope),
        adapter=FakeAdapter(attn),
        scores=PolicyScores(torch.randn(t, n), torch.randn(t)),
        generator=torch.Generator().manual_seed(0),
    )


def members(block, slot: int) -> torch.Tensor:
    return (block.assignment == slot).nonzero().flatten()


# ---------------------------------------------------------------------------------------------------------------------
# every method: exact budget, representatives, positions


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(METHODS),
    t=st.integers(1, 6),
    n=st.integers(1, 12),
    retention=st.floats(0.01, 1.0),
    mrope=st.booleans(),
    static=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_every_method_meets_the_exact_budget(
    name: str, t: int, n: int, retention: float, mrope: bool, static: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    video = torch.randn(1 if static else t, n, 8).expand(t, n, 8) + 0.05 * torch.randn(t, n, 8)
    ctx = ctx_of(video.contiguous(), mrope=mrope)
    block = compress(get_method(name), ctx, retention)
    b = budget(retention, t * n)
    assert block.num_tokens == b and block.embeds.shape == (b, 8)
    assert block.source.numel() == 1 or (block.source.diff() > 0).all(), "video order, one token per position"
    assert torch.equal(block.assignment[block.source], torch.arange(b)), "each representative is its own member"
    s = ctx.enc.video_start
    assert torch.equal(block.positions, ctx.enc.position_ids[..., s + block.source])
    assert block.embeds.dtype == ctx.enc.inputs_embeds.dtype
    if block.kept is not None:
        assert torch.equal(block.embeds, video.reshape(t * n, 8)[block.kept])


# ---------------------------------------------------------------------------------------------------------------------
# shared helpers


@settings(max_examples=60, deadline=None)
@given(
    caps=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    weights=st.lists(st.floats(0.0, 5.0), min_size=8, max_size=8),
    data=st.data(),
)
def test_allocate_is_exact_and_capped(caps: list[int], weights: list[float], data) -> None:
    total = data.draw(st.integers(0, sum(caps)))
    out = allocate(total, torch.tensor(weights[: len(caps)]), torch.tensor(caps), minimum=1)
    assert int(out.sum()) == total and (out <= torch.tensor(caps)).all() and (out >= 0).all()
    if total >= sum(min(1, c) for c in caps):
        assert all(o >= min(1, c) for o, c in zip(out.tolist(), caps, strict=True))
    with pytest.raises(ValueError, match="cannot place"):
        allocate(sum(caps) + 1, torch.ones(len(caps)), torch.tensor(caps))


def test_allocate_follows_weights() -> None:
    assert allocate(10, torch.tensor([1.0, 3.0, 1.0]), torch.tensor([10, 10, 10])).tolist() == [2, 6, 2]
    assert allocate(10, torch.tensor([1.0, 3.0, 1.0]), torch.tensor([10, 3, 10])).tolist() == [4, 3, 3]


def test_dpc_knn_finds_one_centre_per_blob() -> None:
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centres[:, None] + 0.3 * torch.randn(3, 6, 2)).reshape(18, 2)
    assign, chosen = dpc_knn(x, 3, k=4)
    assert sorted((chosen // 6).tolist()) == [0, 1, 2]
    assert all(len(set(assign[b * 6 : (b + 1) * 6].tolist())) == 1 for b in range(3)), "each blob one cluster"


# ---------------------------------------------------------------------------------------------------------------------
# VidCom2: frame-uniqueness budgets, distinctive tokens kept


def test_vidcom2_gives_the_unique_frame_the_largest_budget() -> None:
    torch.manual_seed(0)
    common = torch.randn(8, 16)
    video = torch.stack([common + 0.05 * torch.randn(8, 16) for _ in range(3)] + [torch.randn(8, 16)])
    counts = VidCom2Selector().frame_budgets(SelectionContext(make_enc(video)), 0.25)  # B = 8
    assert int(counts.sum()) == 8 and int(counts.argmax()) == 3 and counts[3] > counts[:3].max()
    keep = get_method("vidcom2").select(SelectionContext(make_enc(video)), 0.25)
    assert torch.equal(torch.bincount(keep // 8, minlength=4), counts)


def test_vidcom2_keeps_each_frames_outlier_token() -> None:
    torch.manual_seed(1)
    video = torch.ones(2, 6, 12) + 0.01 * torch.randn(2, 6, 12)
    video[1, 4] = -1.0  # unlike everything else in the video and its frame
    keep = get_method("vidcom2").select(SelectionContext(make_enc(video)), 2 / 12)  # one token per frame
    assert 6 + 4 in keep.tolist() and keep.numel() == 2


# ---------------------------------------------------------------------------------------------------------------------
# FlashVID: attention-calibrated diversity, tree spatio-temporal merging, DySeg


def test_flashvid_adts_is_diversity_calibrated_by_attention() -> None:
    torch.manual_seed(0)
    e = torch.eye(8)
    x = torch.cat([e[0] + 0.02 * torch.randn(4, 8), e[1] + 0.02 * torch.randn(4, 8)])  # clusters {0..3}, {4..7}
    even = adts(x, torch.ones(8), 2)
    assert sorted((even // 4).tolist()) == [0, 1], "equal attention: one token from each cluster (max-min diversity)"
    attn = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e-3, 1e-3, 1e-3, 1e-3])
    assert (adts(x, attn, 2) < 4).all(), "an unattended cluster is not worth its diversity"
    assert int(adts(x, torch.tensor([1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0]), 1)[0]) == 2


def test_flashvid_trees_link_tokens_to_their_match_in_the_previous_frame() -> None:
    torch.manual_seed(0)
    frame = torch.randn(5, 32)
    video = frame.expand(3, 5, 32).clone()
    video[1] = video[1][[1, 0, 2, 3, 4]]  # token 0 and 1 swap places: trees follow content, not location
    video[2, 3] = torch.randn(32)  # new content in frame 2: a root of its own
    roots = tree_roots(video, torch.ones(3, 5, dtype=torch.bool), 0.8, min_retained=0)
    assert roots[0].tolist() == [0, 1, 2, 3, 4]
    assert roots[1].tolist() == [1, 0, 2, 3, 4]
    assert roots[2].tolist() == [0, 1, 2, 10 + 3, 4]  # frame 2 matches frame 1's tokens, rooted in frame 0
    # the soft threshold keeps at least ``min_retained`` tokens unlinked
    assert (
        int((tree_roots(video, torch.ones(3, 5, dtype=torch.bool), 0.8, 12) == torch.arange(15).view(3, 5)).sum()) >= 12
    )
    # unavailable (ADTS-selected) tokens take part in no tree
    avail = torch.ones(3, 5, dtype=torch.bool)
    avail[0, 2] = False
    r = tree_roots(video, avail, 0.8, 0)
    assert r[0, 2] == -1 and r[1, 2] == 5 + 2


def test_flashvid_merges_static_content_into_its_earliest_frame() -> None:
    torch.manual_seed(0)
    video = torch.randn(1, 9, 16).expand(4, 9, 16) + 0.01 * torch.randn(4, 9, 16)
    block = FlashVIDCompressor(min_segment_num=1).compress(ctx_of(video), 0.5)  # B = 18: 14 ADTS + 4 merged
    sizes = torch.bincount(block.assignment[block.assignment >= 0], minlength=block.num_tokens)
    merged = (sizes > 1).nonzero().flatten()
    assert merged.numel() >= 1
    spans = [members(block, int(k)) // 9 for k in merged]
    assert any(int(s.max()) > int(s.min()) for s in spans), "a merged token spans several frames"
    for k, s in zip(merged.tolist(), spans, strict=True):
        assert int(block.source[k]) // 9 == int(s.min()), "placed at its tree root, in the earliest frame"
        assert torch.allclose(block.embeds[k], video.reshape(36, 16)[members(block, k)].mean(0), atol=0.05)


def test_flashvid_dyseg_cuts_scene_changes_and_tops_up_to_min_segments() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(16), torch.randn(16)
    frames = torch.stack([a, a, a, b, b, b, b, b]) + 0.01 * torch.randn(8, 16)
    assert dyseg_min_segments(frames, 0.9, 1) == [3, 5]
    assert len(dyseg_min_segments(frames, 0.9, 3)) == 3 and sum(dyseg_min_segments(frames, 0.9, 3)) == 8
    assert dyseg_min_segments(frames, 0.9, 8) == [1] * 8  # the published default: at least 8 segments


# ---------------------------------------------------------------------------------------------------------------------
# FastVID: dynamic segments, salient tokens, density-based merging around anchor frames


def test_fastvid_dyseg_cuts_lowest_transitions_and_below_tau() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(16), torch.randn(16)
    frames = torch.stack([a, a, a, b, b, b]) + 0.01 * torch.randn(6, 16)
    assert dyseg(frames, c=2, tau=0.9) == [3, 3]
    assert dyseg(frames, c=1, tau=-1.0) == [6]
    assert dyseg(frames, c=8, tau=0.9) == [1] * 6  # c - 1 = 7 cuts of 5 transitions: every frame alone


def test_fastvid_salient_tokens_and_density_merging_on_anchor_frames() -> None:
    torch.manual_seed(0)
    video = torch.randn(1, 16, 12).expand(8, 16, 12) + 0.2 * torch.randn(8, 16, 12)
    video[:, 5] *= 20  # one high-saliency (high-norm) location
    method = FastVIDCompressor(c=1, tau=-1.0)  # one segment: anchor frames 0 and 4 (p = 4)
    block = method.compress(ctx_of(video), 0.25)  # B = 32: 4 per frame, 1 salient + 3 contextual
    flat = video.reshape(128, 12)
    sizes = torch.bincount(block.assignment[block.assignment >= 0], minlength=block.num_tokens)
    salient = [k for k in range(block.num_tokens) if int(block.source[k]) % 16 == 5]
    assert len(salient) == 8 and all(int(sizes[k]) == 1 for k in salient), "the salient token of every frame"
    contextual = [k for k in range(block.num_tokens) if k not in salient]
    assert len(contextual) == 24 and {int(block.source[k]) // 16 for k in contextual} == {0, 4}
    for k in contextual:
        m = members(block, k)
        anchor = flat[block.source[k]]
        w = max(1.0 / (m.numel() + 1), 0.6)
        assert torch.allclose(block.embeds[k], w * anchor + (1 - w) * flat[m].mean(0), atol=1e-5)
    assert block.covered().numel() == 128, "every token is kept or merged"


# ---------------------------------------------------------------------------------------------------------------------
# PruneVid: static tokens merged over time, spatial clusters, attention selection


def test_prunevid_segments_and_static_tokens() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(9, 16), torch.randn(9, 16)
    video = torch.stack([a] * 4 + [b] * 4) + 0.01 * torch.randn(8, 9, 16)
    assert temporal_segments(video.mean(1), 0.25, 7) == [4, 4]  # int(8 * 0.25) = 2 scenes
    for f in range(4):  # locations 6-8 move in the first scene (their contents rotate: frame means unchanged)
        video[f, 6:] = a[6:].roll(f, dims=0)
    unit, reps, _ = PruneVidCompressor().units(video)
    unit = unit.view(8, 9)
    for loc in range(6):  # static: one unit per scene, placed at the scene's first frame
        assert len(set(unit[:4, loc].tolist())) == 1 and int(reps[unit[0, loc]]) == loc
        assert int(reps[unit[4, loc]]) == 4 * 9 + loc
    assert len(set(unit[:4, 6].tolist())) == 4, "dynamic tokens stay per frame"
    assert reps.numel() == 6 + 4 * 3 + 9  # scene 1: 6 static + 12 dynamic; scene 2: all 9 static


def test_prunevid_keeps_the_most_attended_clusters() -> None:
    torch.manual_seed(0)
    video = torch.randn(4, 9, 16)
    attn = torch.full((36,), 1e-3)
    attn[2 * 9 + 7] = 1.0
    block = get_method("prunevid").compress(ctx_of(video, attn), 0.1)  # B = 3
    assert block.num_tokens == 3 and 2 * 9 + 7 in block.covered().tolist()
    with pytest.raises(ValueError, match=r"prunevid needs ctx\.adapter"):
        get_method("prunevid").compress(SelectionContext(make_enc(video)), 0.1)


def test_prunevid_asks_for_layer_10_clamped_to_the_model() -> None:
    video = torch.randn(4, 9, 16)
    ctx = ctx_of(video)
    get_method("prunevid").compress(ctx, 0.25)
    assert ctx.adapter.calls == [10]  # no model depth known: the published layer

    class Deep(FakeAdapter):
        language_model = type("LM", (), {"layers": [0, 1, 2]})()

    shallow = Deep(torch.rand(36))
    get_method("prunevid").compress(SelectionContext(make_enc(video), adapter=shallow), 0.25)
    assert shallow.calls == [2]


# ---------------------------------------------------------------------------------------------------------------------
# FrameFusion: similar adjacent-frame tokens merged first, then importance pruning


def test_framefusion_merges_repeated_frames_into_the_first() -> None:
    torch.manual_seed(0)
    video = torch.randn(1, 6, 16).expand(3, 6, 16) + 0.01 * torch.randn(3, 6, 16)
    block = get_method("framefusion").compress(SelectionContext(make_enc(video)), 1 / 3)  # B = 6, no adapter
    assert block.source.tolist() == list(range(6)), "merged into frame 0's tokens, at their positions"
    assert block.covered().numel() == 18
    assert torch.allclose(block.embeds, video.mean(0), atol=1e-6)


def test_framefusion_never_merges_below_the_budget_and_prunes_by_attention() -> None:
    torch.manual_seed(0)
    video = torch.randn(1, 8, 16).expand(2, 8, 16).clone()
    block = get_method("framefusion").compress(SelectionContext(make_enc(video)), 0.75)  # B = 12: 4 merges allowed
    sizes = torch.bincount(block.assignment, minlength=12)
    assert block.num_tokens == 12 and int((sizes == 2).sum()) == 4
    # nothing similar: no merging, the B most attended tokens (what FastV keeps with the same attention)
    noise = torch.randn(3, 8, 16)
    attn = torch.rand(24)
    block = FrameFusionCompressor().compress(ctx_of(noise, attn), 0.25)
    assert block.kept is None and block.source.tolist() == attn.argsort(descending=True)[:6].sort().values.tolist()


def test_framefusion_similarity_bound() -> None:
    torch.manual_seed(0)
    base = F.normalize(torch.randn(4, 16), dim=-1)
    other = F.normalize(torch.randn(4, 16), dim=-1)
    video = torch.stack([base, 0.7 * base + 0.3 * other])  # similarity around 0.9 at every position
    sims = F.cosine_similarity(video[0], video[1], dim=-1)
    block = FrameFusionCompressor(similarity_lower_bound=float(sims.max()) + 1e-3).compress(
        ctx_of(video, torch.arange(8.0)), 0.5
    )
    assert block.covered().numel() == 4, "nothing similar enough: pruned by attention only"
