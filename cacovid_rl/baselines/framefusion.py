"""FrameFusion: "FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large Visual
Language Models" (Fu, Fang, Li, Zhao, Wang, Xu, Wang, Yang, Wang; ICCV 2025; arXiv 2501.01986;
github.com/thu-nics/FrameFusion).

FrameFusion first merges *similar* tokens, then prunes *unimportant* ones. With its defaults
(``FrameFusion(cost=0.3, similarity_lower_bound=0.6, ratio_lower_bound=0.1)``):

- Merging: each video token is compared (cosine) with the token at the same spatial position in the previous
  frame; every token with similarity >= ``0.6`` merges into that earlier token, a run of consecutive merges into
  the run's first token, by averaging. Merging repeats (once per LLM layer in the paper) while a round still
  merges at least ``ratio_lower_bound = 10%`` of the remaining video tokens, and never merges more than the
  budget allows (beyond it only the most similar pairs merge, and merging stops).
- Pruning: the remaining tokens with the least attention are dropped to meet the budget (FastV-style).

Positions: a merged token keeps the position of its run's first token (its earliest frame), as FrameFusion keeps
that token's slot and drops the later ones.

Input-side differences: FrameFusion merges hidden states at successive LLM layers (0, 1, ...) and prunes by the
attention all tokens pay at the layer after merging ends, under a FLOPs ``cost`` (0.3 of the full model). Here
every round compares the (averaged) LLM-input embeddings, the budget is the token count ``B`` rather than a FLOPs
cost, and importance is the attention of the last input token at layer 2 (``adapter.early_layer_attention``,
FastV's layer), summed over a merged token's members (the softmax mass its members' keys would share). The
adapter is needed only when merging alone leaves more than ``B`` tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cacovid_rl.baselines.base import CompressedVideo, SelectionContext, budget, build_block, video_features
from cacovid_rl.baselines.common import llm_attention
from cacovid_rl.baselines.registry import register


def merge_rounds(
    feats: torch.Tensor, max_merges: int, similarity: float, ratio_lower_bound: float
) -> tuple[torch.Tensor, int]:
    """Run FrameFusion's merging on ``[T, N, D]``: ``head [T*N]`` (flat index of the surviving token each one merged
    into, itself for survivors) and the number of rounds run."""
    t, n, d = feats.shape
    device = feats.device
    sums = feats.reshape(t * n, d).float().clone()
    counts = torch.ones(t * n, device=device)
    head = torch.arange(t * n, device=device)
    alive = torch.ones(t * n, dtype=torch.bool, device=device)
    merged = rounds = 0
    while merged < max_merges:
        rounds += 1
        # Per spatial position, alive tokens in frame order; each is compared with the previous alive one.
        order = torch.arange(t * n, device=device).reshape(t, n).T.reshape(-1)  # position-major
        order = order[alive[order]]
        pos = order % n
        prev_ok = torch.cat([torch.zeros(1, dtype=torch.bool, device=device), pos[1:] == pos[:-1]])
        means = F.normalize(sums[order] / counts[order, None], dim=-1)
        sim = torch.full((order.numel(),), -2.0, device=device)
        sim[1:] = (means[1:] * means[:-1]).sum(-1)
        sim = torch.where(prev_ok, sim, torch.full_like(sim, -2.0))
        cand = sim >= similarity
        room = max_merges - merged
        stop = False
        if int(cand.sum()) > room:
            top = sim.argsort(descending=True, stable=True)[:room]
            cand = torch.zeros_like(cand)
            cand[top] = True
            stop = True
        n_new = int(cand.sum())
        if n_new == 0:
            break
        # Each merged token goes to the first token of its run of consecutive merges (the last non-merged before it).
        idx = torch.arange(order.numel(), device=device)
        start = torch.where(cand, torch.zeros_like(idx), idx).cummax(0).values
        target = order[start]
        src = order[cand]
        dst = target[cand]
        sums.index_add_(0, dst, sums[src])
        counts.index_add_(0, dst, counts[src])
        alive[src] = False
        head[src] = dst  # a pointer to the absorbing token; chains are resolved at the end
        ratio = n_new / order.numel()
        merged += n_new
        if stop or ratio < ratio_lower_bound:
            break
    while True:  # follow absorbed -> absorbing pointers to the surviving token (at most one hop per round)
        nxt = head[head]
        if torch.equal(nxt, head):
            return head, rounds
        head = nxt


@register("framefusion")
class FrameFusionCompressor:
    """Merge same-position tokens of consecutive frames (cosine >= 0.6), then keep the ``B`` most attended."""

    name = "framefusion"

    def __init__(self, similarity_lower_bound: float = 0.6, ratio_lower_bound: float = 0.1, layer: int = 2) -> None:
        self.similarity_lower_bound = similarity_lower_bound
        self.ratio_lower_bound = ratio_lower_bound
        self.layer = layer

    def compress(self, ctx: SelectionContext, retention: float) -> CompressedVideo:
        feats = video_features(ctx)
        t, n, d = feats.shape
        b = budget(retention, t * n)
        device = feats.device
        head, _ = merge_rounds(feats, t * n - b, self.similarity_lower_bound, self.ratio_lower_bound)
        heads, group = torch.unique(head, return_inverse=True)  # heads sorted: the run starts
        flat = feats.reshape(t * n, d)
        counts = torch.bincount(group, minlength=heads.numel()).float()
        mean = torch.zeros(heads.numel(), d, device=device).index_add_(0, group, flat) / counts[:, None]
        if heads.numel() > b:
            attn = llm_attention(ctx, self.layer, "framefusion").to(device)
            mass = torch.zeros(heads.numel(), device=device).index_add_(0, group, attn)
            keep = mass.argsort(descending=True, stable=True)[:b]
        else:
            keep = torch.arange(heads.numel(), device=device)
        slot = torch.full((heads.numel(),), -1, dtype=torch.long, device=device)
        slot[keep] = torch.arange(keep.numel(), device=device)
        block = build_block(ctx.enc, mean[keep], heads[keep], slot[group])
        assert block.num_tokens == b, (block.num_tokens, b)
        return block
