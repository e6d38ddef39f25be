"""DivPrune: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(Alvar, Singh, Akbari, Zhang; CVPR 2025).

DivPrune casts pruning as a Max-Min Diversity Problem: keep the subset whose closest pair is as far apart as
possible, solved greedily on cosine distance. The first token is the one farthest from its nearest
neighbour; each next token is the one whose distance to the already-kept set (its nearest kept token) is
largest. Applied to all video tokens of the question jointly (the LLM-input features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cacovid_rl.baselines.base import SelectionContext, budget, video_features
from cacovid_rl.baselines.registry import register

# Above this many pairwise entries the distance rows are computed on the fly instead of stored (~256 MB).
_MAX_MATRIX = 1 << 26
_ROW_CHUNK = 1024


def _nearest_neighbour_distance(x: torch.Tensor) -> torch.Tensor:
    """Cosine distance of every row of unit vectors ``x`` to its nearest other row, in row chunks."""
    m = x.shape[0]
    out = torch.empty(m, device=x.device)
    for start in range(0, m, _ROW_CHUNK):
        d = 1.0 - x[start : start + _ROW_CHUNK] @ x.T
        rows = torch.arange(start, min(start + _ROW_CHUNK, m), device=x.device)
        d[rows - start, rows] = float("inf")
        out[start : start + _ROW_CHUNK] = d.amin(-1)
    return out


def divprune_order(features: torch.Tensor, count: int) -> torch.LongTensor:
    """Greedy max-min diversity order of ``count`` rows of ``features [M, D]`` under cosine distance."""
    x = F.normalize(features.float(), dim=-1)
    m = x.shape[0]
    if m == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    full = 1.0 - x @ x.T if m * m <= _MAX_MATRIX else None

    def dist_row(i: int) -> torch.Tensor:
        return full[i] if full is not None else 1.0 - x @ x[i]

    first = int(_nearest_neighbour_distance(x).argmax())
    chosen = [first]
    min_dist = dist_row(first).clone()
    min_dist[first] = -float("inf")
    for _ in range(count - 1):
        nxt = int(min_dist.argmax())
        chosen.append(nxt)
        min_dist = torch.minimum(min_dist, dist_row(nxt))
        min_dist[nxt] = -float("inf")
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


@register("divprune")
class DivPruneSelector:
    """Keeps the ``B`` most mutually diverse video tokens (greedy max-min cosine distance)."""

    name = "divprune"

    def select(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        feats = video_features(ctx)
        total = feats.shape[0] * feats.shape[1]
        order = divprune_order(feats.reshape(total, -1), budget(retention, total))
        return order.sort().values.to(ctx.enc.inputs_embeds.device)
