"""PruneVid: "PruneVid: Visual Token Pruning for Efficient Video Large Language Models" (Huang, Zhou, Chen, Wang,
Liu, Wang; ACL 2025 Findings; arXiv 2412.16117; github.com/Visual-AI/PruneVid).

With the published defaults (``scripts/eval.sh``: ``temporal_segment_ratio=0.25``, ``tau=0.8``,
``cluster_ratio=0.5``, ``alpha=0.4``, ``selected_layer=10``; DPC-kNN with ``k=7``):

1. Temporal segments: DPC-kNN clusters the frames' mean features into ``int(0.25 T)`` clusters; runs of equal
   labels become segments, and a one-frame run joins its longer neighbour (the published refinement).
2. Static / dynamic tokens, per segment of ``L > 1`` frames: a spatial location whose tokens have mean pairwise
   cosine similarity over the segment above ``0.8`` is *static* and its ``L`` tokens are averaged into one (the
   published Eq. 4); the other tokens are *dynamic* and stay per frame.
3. Spatial merging: DPC-kNN clusters the segment's static tokens together and each frame's dynamic tokens
   separately (``cluster_ratio=0.5`` of each group), and each cluster is averaged.
4. Question-aware selection: inside the LLM at layer 10 PruneVid keeps the ``alpha = 40%`` merged tokens that the
   question attends to most (and prunes the KV cache accordingly).

Positions: a static token takes its location's position in the segment's first frame; a cluster takes the
position of its DPC-kNN centre.

Input-side differences: step 4 runs before the LLM: a merged token's attention is the sum of its members'
attention from the last input token at layer 10 (``adapter.early_layer_attention``, clamped to the model's last
layer; the sum is the softmax mass its members' keys would share), and the top ``B`` are kept. For the exact
budget ``B``, PruneVid's two ratios cannot both hold: ``alpha = 0.4`` is kept and the clustering forms
``min(ceil(B / 0.4), #tokens after static merging)`` clusters (at least ``B``; the cluster ratio follows), split
over the groups in proportion to their sizes (largest remainder, one or more per group while they fit); when
static merging alone leaves fewer than ``B`` tokens, the least similar static locations stay dynamic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cacovid_rl.baselines.base import CompressedVideo, SelectionContext, budget, build_block, video_features
from cacovid_rl.baselines.common import allocate, average_groups, dpc_knn, llm_attention
from cacovid_rl.baselines.registry import register


def temporal_segments(frame_features: torch.Tensor, ratio: float, k: int) -> list[int]:
    """Segment lengths: DPC-kNN frame clusters -> contiguous runs; one-frame runs join their longer neighbour."""
    t = frame_features.shape[0]
    clusters = max(1, int(t * ratio))
    if t == 1 or clusters == 1:
        return [t]
    labels, _ = dpc_knn(frame_features, clusters, min(k, t))
    runs: list[int] = []
    prev = None
    for lab in labels.tolist():
        if lab == prev:
            runs[-1] += 1
        else:
            runs.append(1)
        prev = lab
    i = 0
    while len(runs) > 1 and i < len(runs):
        if runs[i] == 1:
            left = runs[i - 1] if i > 0 else -1
            right = runs[i + 1] if i + 1 < len(runs) else -1
            j = i - 1 if left >= right else i + 1
            runs[j] += 1
            del runs[i]
            i = 0
        else:
            i += 1
    return runs


def location_similarity(segment: torch.Tensor) -> torch.Tensor:
    """``[N]`` mean pairwise cosine similarity over the frames of each location's tokens (``-inf`` for one frame)."""
    length = segment.shape[0]
    if length < 2:
        return torch.full((segment.shape[1],), -float("inf"), device=segment.device)
    x = F.normalize(segment.float(), dim=-1)  # [L, N, D]
    gram = torch.einsum("snd,tnd->nst", x, x)  # [N, L, L]
    return (gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (length * (length - 1))


@register("prunevid")
class PruneVidCompressor:
    """Static-token temporal merging + DPC-kNN spatial merging, then attention selection of ``B`` merged tokens."""

    name = "prunevid"

    def __init__(
        self,
        temporal_segment_ratio: float = 0.25,
        threshold: float = 0.8,
        alpha: float = 0.4,
        layer: int = 10,
        knn_k: int = 7,
    ) -> None:
        self.temporal_segment_ratio = temporal_segment_ratio
        self.threshold = threshold
        self.alpha = alpha
        self.layer = layer
        self.knn_k = knn_k

    def units(self, feats: torch.Tensor, min_units: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Tokens after static merging: ``unit [T*N]`` (unit id of each token), ``rep [U]``, and the spatial groups
        (unit ids clustered together: a segment's static units, or one frame's dynamic units).

        When static merging would leave fewer than ``min_units`` tokens (the budget), the least similar static
        locations are treated as dynamic until enough remain, so the budget can still be met exactly.
        """
        t, n, _ = feats.shape
        device = feats.device
        lengths = temporal_segments(feats.mean(1), self.temporal_segment_ratio, self.knn_k)
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        sims = [location_similarity(feats[s : s + length]) for s, length in zip(starts, lengths, strict=True)]
        static = [sim > self.threshold for sim in sims]
        count = t * n - sum(int(st.sum()) * (length - 1) for st, length in zip(static, lengths, strict=True))
        if count < min_units:
            cand = [
                (float(sims[i][loc]), i, loc) for i, st in enumerate(static) for loc in st.nonzero().flatten().tolist()
            ]
            for _, i, loc in sorted(cand):
                if count >= min_units:
                    break
                static[i][loc] = False
                count += lengths[i] - 1
        unit = torch.full((t * n,), -1, dtype=torch.long, device=device)
        reps: list[int] = []
        groups: list[torch.Tensor] = []
        for start, length, st in zip(starts, lengths, static, strict=True):
            ids = []
            for loc in st.nonzero().flatten().tolist():
                unit[(start + torch.arange(length, device=device)) * n + loc] = len(reps)
                ids.append(len(reps))
                reps.append(start * n + loc)
            if ids:
                groups.append(torch.tensor(ids, device=device))
            for f in range(start, start + length):
                ids = []
                for loc in (~st).nonzero().flatten().tolist():
                    unit[f * n + loc] = len(reps)
                    ids.append(len(reps))
                    reps.append(f * n + loc)
                if ids:
                    groups.append(torch.tensor(ids, device=device))
        return unit, torch.tensor(reps, device=device), groups

    def compress(self, ctx: SelectionContext, retention: float) -> CompressedVideo:
        feats = video_features(ctx)
        t, n, d = feats.shape
        b = budget(retention, t * n)
        flat = feats.reshape(t * n, d)
        unit, reps, groups = self.units(feats, min_units=b)
        unit_mean = average_groups(flat, unit, reps.numel())
        target = min(reps.numel(), max(b, math.ceil(b / self.alpha)))
        sizes = torch.tensor([g.numel() for g in groups])
        per_group = allocate(target, sizes.double(), sizes, minimum=1)
        cluster_of_unit = torch.full((reps.numel(),), -1, dtype=torch.long, device=flat.device)
        centre_rep: list[int] = []
        for g, c in zip(groups, per_group.tolist(), strict=True):
            if c == 0:
                continue
            assign, centres = dpc_knn(unit_mean[g], c, self.knn_k)
            cluster_of_unit[g] = assign + len(centre_rep)
            centre_rep.extend(reps[g[centres]].tolist())
        token_cluster = cluster_of_unit[unit]  # -1: its group got no cluster
        m = len(centre_rep)
        attn = llm_attention(ctx, self.layer, "prunevid").to(flat.device)
        covered = token_cluster >= 0
        mass = torch.zeros(m, device=flat.device).index_add_(0, token_cluster[covered], attn[covered])
        # Cluster embedding: the mean of its (static-averaged) units, as PruneVid averages the clustered tokens.
        cl_units = cluster_of_unit >= 0
        cluster_mean = average_groups(unit_mean[cl_units], cluster_of_unit[cl_units], m)
        keep = mass.argsort(descending=True, stable=True)[:b]
        slot = torch.full((m,), -1, dtype=torch.long, device=flat.device)
        slot[keep] = torch.arange(b, device=flat.device)
        assignment = torch.where(covered, slot[token_cluster.clamp_min(0)], token_cluster)
        block = build_block(ctx.enc, cluster_mean[keep], torch.tensor(centre_rep, device=flat.device)[keep], assignment)
        assert block.num_tokens == b, (block.num_tokens, b)
        return block
