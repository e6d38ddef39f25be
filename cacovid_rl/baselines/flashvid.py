"""FlashVID: "FlashVID: Efficient Video Large Language Models via Training-free Tree-based Spatiotemporal Token
Merging" (Fan, Chen, Xing, Li, Jiang, Tian; ICLR 2026; arXiv 2602.08024; github.com/Fanziyang-v/FlashVID).

Per video, with the published defaults (``FlashVidConfig``):

1. DySeg: cut the video where adjacent frames' mean features have cosine similarity below ``0.9``, adding cuts
   at the least similar transitions until there are at least ``min_segment_num=8`` segments.
2. ADTS (attention and diversity-based token selection), per frame, ``alpha=0.7`` of the frame's budget: greedy
   max-min diversity on cosine distance, each candidate's distance calibrated (multiplied) by its attention, so
   the kept tokens are both salient and mutually different.
3. TSTM (tree-based spatio-temporal merging), the other 30%, per segment: every remaining token links to its most
   similar remaining token of the previous frame when their cosine similarity exceeds ``0.8`` (a soft threshold
   is used when too few tokens would stay); the links form trees rooted in the earliest frame, each tree is
   averaged; then, per frame, the tree roots are clustered with DPC-kNN (``k = min(clusters, 7)``) into as many
   tokens as the budget allows and each cluster averaged.

Positions: an ADTS token keeps its own; a TSTM token takes the position of its DPC-kNN cluster centre, itself a
tree root (a token of the earliest frame of its tree), as the published code does (``cluster_center_indices``).

Input-side differences: (a) the attention of step 2 is the vision encoder's [CLS]/global attention, which is
gone from the LLM input; the saliency proxy is the token's feature L2 norm (as ``visionzip`` here: high-norm
tokens are the ones ViTs attend to, Darcet et al., ICLR 2024); (b) FlashVID keeps ``expansion=1.25`` x the budget
at the input and prunes inside the LLM at layer 20 (FastV-style, to ``llm_retention_ratio``); here the input block
is the whole budget and nothing is pruned inside the LLM; (c) budgets are exact: ``B`` is split over frames
(``visionzip.frame_shares``), each share ``ceil(0.7 s)`` : rest, and a segment's TSTM budget over its frames by
largest remainder on their root counts (the published ``ceil`` per frame can exceed the budget); (d) trees are
averaged over all their members (the published code counts an absorbed subtree as one token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cacovid_rl.baselines.base import CompressedVideo, SelectionContext, budget, build_block, video_features
from cacovid_rl.baselines.common import allocate, average_groups, dpc_knn, lengths_from_cuts, transition_similarity
from cacovid_rl.baselines.registry import register
from cacovid_rl.baselines.visionzip import frame_shares


def dyseg_min_segments(frame_features: torch.Tensor, threshold: float, min_segments: int) -> list[int]:
    """FlashVID's DySeg: cuts below ``threshold``, topped up with the least similar transitions to ``min_segments``."""
    t = frame_features.shape[0]
    if t == 1:
        return [1]
    sim = transition_similarity(frame_features)
    cuts = (sim < threshold).nonzero().flatten()
    need = min(min_segments, t) - (cuts.numel() + 1)
    if need > 0:
        rest = sim.clone()
        rest[cuts] = float("inf")
        extra = rest.argsort(stable=True)[:need]
        cuts = torch.cat([cuts, extra])
    return lengths_from_cuts(cuts, t)


def adts(features: torch.Tensor, attention: torch.Tensor, count: int) -> torch.LongTensor:
    """Attention-calibrated greedy max-min diversity over one frame's tokens ``[N, D]``: ``count`` indices.

    Candidate ``j``'s score is ``attention[j] * min_{k kept} (1 - cos(x_k, x_j))``; the first pick uses the
    distance to ``j``'s nearest other token.
    """
    n = features.shape[0]
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    x = F.normalize(features.float(), dim=-1)
    dist = (1.0 - x @ x.T) * attention.float()[None, :]
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    off = dist + torch.diag(torch.full((n,), float("inf"), device=features.device))
    first = int(off.amin(0).argmax())
    chosen = [first]
    score = dist[first].clone()
    score[first] = -float("inf")
    for _ in range(count - 1):
        nxt = int(score.argmax())
        chosen.append(nxt)
        score = torch.minimum(score, dist[nxt])
        score[chosen] = -float("inf")
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def tree_roots(
    features: torch.Tensor, available: torch.Tensor, threshold: float, min_retained: int
) -> torch.LongTensor:
    """Root ``[L, N]`` (flat index within the segment) of every token's temporal tree; ``-1`` for unavailable ones.

    A token links to its most cosine-similar available token of the previous frame when the similarity exceeds
    ``threshold``; when fewer than ``min_retained`` tokens (unavailable ones included) would stay unlinked, the
    threshold rises to keep exactly enough (FlashVID's soft threshold).
    """
    length, n, _ = features.shape
    x = F.normalize(features.float(), dim=-1)
    best = torch.full((length, n), -1.0, device=features.device)
    parent = torch.zeros((length, n), dtype=torch.long, device=features.device)
    for f in range(1, length):
        sim = x[f] @ x[f - 1].T
        sim = sim.masked_fill(~available[f][:, None] | ~available[f - 1][None, :], -1.0)
        best[f], parent[f] = sim.max(-1)
    link = best > threshold
    if int((~link).sum()) < min_retained:
        k = length * n - min_retained
        soft = best.reshape(-1).topk(k).values[-1].item() if k > 0 else float("inf")
        link = best > max(soft, -1.0 + 1e-6)
    roots = torch.full((length, n), -1, dtype=torch.long, device=features.device)
    idx = torch.arange(n, device=features.device)
    for f in range(length):
        own = f * n + idx
        if f == 0:
            roots[0] = own
        else:
            roots[f] = torch.where(link[f], roots[f - 1][parent[f]], own)
    return torch.where(available, roots, torch.full_like(roots, -1))


@register("flashvid")
class FlashVIDCompressor:
    """ADTS selection (70% of each frame's budget) + tree spatio-temporal merging (30%), per DySeg segment."""

    name = "flashvid"

    def __init__(
        self,
        alpha: float = 0.7,
        temporal_threshold: float = 0.8,
        segment_threshold: float = 0.9,
        min_segment_num: int = 8,
        knn_k: int = 7,
    ) -> None:
        self.alpha = alpha
        self.temporal_threshold = temporal_threshold
        self.segment_threshold = segment_threshold
        self.min_segment_num = min_segment_num
        self.knn_k = knn_k

    def compress(self, ctx: SelectionContext, retention: float) -> CompressedVideo:
        feats = video_features(ctx)
        t, n, d = feats.shape
        b = budget(retention, t * n)
        device = feats.device
        shares = frame_shares(b, t, device=device)
        n_adts = torch.minimum(torch.ceil(shares.double() * self.alpha).long(), shares)
        n_sttm = shares - n_adts
        saliency = feats.norm(dim=-1)
        flat = feats.reshape(t * n, d)
        assignment = torch.full((t * n,), -1, dtype=torch.long, device=device)
        embeds: list[torch.Tensor] = []
        sources: list[int] = []

        def emit(members: torch.Tensor, embed: torch.Tensor, source: int) -> None:
            assignment[members] = len(sources)
            embeds.append(embed)
            sources.append(source)

        start = 0
        for length in dyseg_min_segments(feats.mean(1), self.segment_threshold, self.min_segment_num):
            seg = slice(start, start + length)
            available = torch.ones(length, n, dtype=torch.bool, device=device)
            for i, f in enumerate(range(start, start + length)):
                for j in adts(feats[f], saliency[f], int(n_adts[f])).tolist():
                    available[i, j] = False
                    emit(torch.tensor([f * n + j], device=device), flat[f * n + j], f * n + j)
            sttm = int(n_sttm[seg].sum())
            if sttm > 0:
                roots = tree_roots(feats[seg], available, self.temporal_threshold, int(shares[seg].sum()))
                roots = roots + start * n  # segment-local -> video flat index (valid entries only)
                members = (roots >= start * n).reshape(-1).nonzero().flatten() + start * n
                root_of = roots.reshape(-1)[members - start * n]
                root_ids, tree = torch.unique(root_of, return_inverse=True)
                tree_mean = average_groups(flat[members], tree, root_ids.numel())
                per_frame = torch.bincount(root_ids // n - start, minlength=length)
                clusters = allocate(sttm, per_frame.double(), per_frame)
                for i in range(length):
                    c = int(clusters[i])
                    if c == 0:
                        continue
                    in_frame = (root_ids // n == start + i).nonzero().flatten()
                    assign, centres = dpc_knn(tree_mean[in_frame], c, min(c, self.knn_k))
                    cluster_mean = average_groups(tree_mean[in_frame], assign, c)
                    for ci in range(c):
                        trees = in_frame[assign == ci]
                        emit(members[torch.isin(tree, trees)], cluster_mean[ci], int(root_ids[in_frame[centres[ci]]]))
            start += length
        block = build_block(ctx.enc, torch.stack(embeds), torch.tensor(sources), assignment)
        assert block.num_tokens == b, (block.num_tokens, b)
        return block
