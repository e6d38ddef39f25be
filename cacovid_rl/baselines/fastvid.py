"""FastVID: "FastVID: Dynamic Density Pruning for Fast Video Large Language Models" (Shen, Gong, Shao, Chen,
Lu, Yu, Xu; NeurIPS 2025; arXiv 2503.11187; github.com/LunarShen/FastVID).

With the published defaults (``scripts/eval.sh``: ``DySeg_c=8``, ``DySeg_tau=0.9``, ``STPrune_d=0.4``,
``DTM_p=4``, ``DTM_beta=0.6``):

1. DySeg (dynamic temporal segmentation): cut the video after the ``c - 1 = 7`` least similar adjacent-frame
   transitions and after every transition whose cosine similarity (of frame global features) is below ``0.9``.
2. STPrune, per frame of budget ``s``: ``floor(0.4 s)`` *salient* tokens by attention (ATS), then the other
   ``s - floor(0.4 s)`` *contextual* tokens by density-based token merging (DTM) within the segment: anchor
   frames every ``p = 4`` frames from the segment start; the segment's contextual budget is spread over the
   anchor frames, each taking its highest DPC-kNN density-peak tokens (``k = 4`` neighbours) among its
   non-salient tokens as anchors; every non-salient token of the segment joins its most cosine-similar anchor;
   a contextual token is ``beta' * anchor + (1 - beta') * mean(cluster)`` with ``beta' = max(1/(|cluster|+1), 0.6)``.

Positions: a salient token keeps its own; a contextual token takes its anchor token's position (the published
code returns the anchor's global index).

Input-side differences: (a) the frame global features and the ATS attention come from SigLIP's attention-pooling
head in the published code; here the frame feature is the mean of the frame's tokens and the attention proxy is
the token's feature L2 norm (as ``visionzip`` and ``flashvid``); (b) budgets are exact: ``B`` is split over
frames (``visionzip.frame_shares``), a segment's contextual budget over its anchor frames by largest remainder,
spilling to the other frames of the segment when the anchor frames run out of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cacovid_rl.baselines.base import CompressedVideo, SelectionContext, budget, build_block, video_features
from cacovid_rl.baselines.common import allocate, dpc_scores, lengths_from_cuts, transition_similarity
from cacovid_rl.baselines.registry import register
from cacovid_rl.baselines.visionzip import frame_shares


def dyseg(frame_features: torch.Tensor, c: int, tau: float) -> list[int]:
    """FastVID's DySeg: segment lengths after cutting at the ``c-1`` least similar transitions and all below ``tau``."""
    t = frame_features.shape[0]
    if t == 1:
        return [1]
    sim = transition_similarity(frame_features)
    lowest = sim.argsort(stable=True)[: max(0, min(c - 1, t - 1))]
    cuts = torch.cat([lowest, (sim < tau).nonzero().flatten()])
    return lengths_from_cuts(cuts, t)


@register("fastvid")
class FastVIDCompressor:
    """DySeg segments; per frame 40% salient tokens, the rest density-merged around anchor-frame tokens."""

    name = "fastvid"

    def __init__(self, c: int = 8, tau: float = 0.9, d: float = 0.4, p: int = 4, beta: float = 0.6, knn_k: int = 4):
        if p < 1:
            raise ValueError(f"p (anchor frame step) must be >= 1, got {p}")
        self.c, self.tau, self.d, self.p, self.beta, self.knn_k = c, tau, d, p, beta, knn_k

    def compress(self, ctx: SelectionContext, retention: float) -> CompressedVideo:
        feats = video_features(ctx)
        t, n, dim = feats.shape
        b = budget(retention, t * n)
        device = feats.device
        shares = frame_shares(b, t, device=device)
        n_sal = torch.floor(shares.double() * self.d).long()
        saliency = feats.norm(dim=-1)
        flat = feats.reshape(t * n, dim)
        unit = F.normalize(flat, dim=-1)
        assignment = torch.full((t * n,), -1, dtype=torch.long, device=device)
        embeds: list[torch.Tensor] = []
        sources: list[int] = []
        free = torch.ones(t, n, dtype=torch.bool, device=device)  # not salient
        for f in range(t):
            top = saliency[f].argsort(descending=True, stable=True)[: int(n_sal[f])]
            free[f, top] = False
            for j in top.tolist():
                assignment[f * n + j] = len(sources)
                embeds.append(flat[f * n + j])
                sources.append(f * n + j)
        start = 0
        for length in dyseg(feats.mean(1), self.c, self.tau):
            frames = list(range(start, start + length))
            budget_ctx = int((shares - n_sal)[start : start + length].sum())
            start += length
            if budget_ctx == 0:
                continue
            capacity = free[frames].sum(-1)
            is_anchor = torch.tensor([i % self.p == 0 for i in range(length)], device=capacity.device)
            # Anchor frames share the budget evenly; the other frames only take what the anchors cannot hold.
            anchor_caps = torch.where(is_anchor, capacity, torch.zeros_like(capacity))
            first = min(budget_ctx, int(anchor_caps.sum()))
            per_frame = allocate(first, is_anchor.double(), anchor_caps)
            if budget_ctx > first:
                per_frame += allocate(budget_ctx - first, torch.ones(length), capacity.cpu() - per_frame)
            anchors: list[int] = []
            for i, f in enumerate(frames):
                k = int(per_frame[i])
                if k == 0:
                    continue
                cand = free[f].nonzero().flatten()
                score = dpc_scores(feats[f, cand], self.knn_k)
                anchors.extend((f * n + cand[score.argsort(descending=True, stable=True)[:k]]).tolist())
            anchor_idx = torch.tensor(anchors, device=device)
            members = (free[frames].reshape(-1).nonzero().flatten() + frames[0] * n).to(device)
            assign = (unit[members] @ unit[anchor_idx].T).argmax(-1)
            assign[torch.searchsorted(members, anchor_idx)] = torch.arange(anchor_idx.numel(), device=device)
            counts = torch.bincount(assign, minlength=anchor_idx.numel()).float()
            mean = torch.zeros(anchor_idx.numel(), dim, device=device).index_add_(0, assign, flat[members])
            mean = mean / counts[:, None]
            w = torch.clamp(1.0 / (counts + 1.0), min=self.beta)[:, None]
            contextual = w * flat[anchor_idx] + (1 - w) * mean
            assignment[members] = assign + len(sources)
            embeds.extend(contextual)
            sources.extend(anchors)
        block = build_block(ctx.enc, torch.stack(embeds), torch.tensor(sources), assignment)
        assert block.num_tokens == b, (block.num_tokens, b)
        return block
