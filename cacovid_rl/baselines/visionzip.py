"""VisionZip: "VisionZip: Longer is Better but Not Necessary in Vision Language Models"
(Yang, Chen, Tian, Wang, Chen, Jia, Shen; CVPR 2025).

VisionZip keeps, per image, a few *dominant* tokens (those receiving the most attention in the vision
encoder) and a few *contextual* tokens: the remaining tokens are grouped around evenly spaced target tokens
by similarity and merged into them. Its default split is 54 dominant : 10 contextual (of 64 tokens).

Adaptation here (selection happens at the LLM input and must return real token indices):
- Each frame is one image; the budget ``B`` is split evenly over frames, each frame's share split 54:10.
- Saliency proxy for "attention received": the L2 norm of the token's LLM-input feature. The vision
  encoder's attention is not available at this point, and the tokens that absorb most attention in ViTs are
  the high-norm outlier tokens ("Vision Transformers Need Registers", Darcet et al., ICLR 2024), which is
  what VisionZip's dominant selection picks up.
- Contextual: targets evenly spaced over the frame's non-dominant tokens; every non-dominant token joins
  its most cosine-similar target (of the same frame); instead of the merged average, each cluster keeps
  its real member closest (cosine) to the cluster mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cacovid_rl.baselines.base import SelectionContext, budget, video_features
from cacovid_rl.baselines.registry import register
from cacovid_rl.policy.selection import evenly_spaced

DOMINANT, CONTEXTUAL = 54, 10


def frame_shares(total: int, t: int, device: torch.device | None = None) -> torch.LongTensor:
    """``total`` split over ``t`` frames as evenly as possible; the remainder goes to evenly spaced frames."""
    shares = torch.full((t,), total // t, dtype=torch.long, device=device)
    shares[evenly_spaced(t, total % t, device=device)] += 1
    return shares


def _dominant_mask(saliency: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[T, N]`` mask of each frame's ``counts[t]`` most salient tokens."""
    t, n = saliency.shape
    order = saliency.argsort(dim=-1, descending=True, stable=True)
    taken = torch.arange(n, device=saliency.device)[None, :] < counts[:, None]
    return torch.zeros(t, n, dtype=torch.bool, device=saliency.device).scatter(1, order, taken)


def _target_mask(remaining: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[T, N]`` mask of ``counts[t]`` targets evenly spaced over each frame's remaining tokens."""
    r = remaining.sum(-1)  # remaining per frame
    c_max = int(counts.max()) if counts.numel() else 0
    if c_max == 0:
        return torch.zeros_like(remaining)
    j = torch.arange(c_max, device=remaining.device)[None, :]
    c = counts[:, None]
    denom = (2 * (c - 1)).clamp_min(1)
    pos = torch.where(c > 1, (2 * j * (r[:, None] - 1) + (c - 1)) // denom, torch.zeros_like(j))
    valid = j < c  # [T, c_max]
    rank = remaining.long().cumsum(-1) - 1  # position of each remaining token among its frame's remaining
    hit = (rank[:, :, None] == pos[:, None, :]) & valid[:, None, :]
    return remaining & hit.any(-1)


def _cluster_representatives(feats: torch.Tensor, remaining: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Flat indices of one real token per target's cluster (member closest to the cluster mean)."""
    t, n, _ = feats.shape
    x = F.normalize(feats.reshape(t * n, -1), dim=-1)
    members = remaining.reshape(-1).nonzero().squeeze(1)
    tgt = targets.reshape(-1).nonzero().squeeze(1)
    if tgt.numel() == 0:
        return tgt
    sim = x[members] @ x[tgt].T  # [R, C]
    same_frame = (members // n)[:, None] == (tgt // n)[None, :]
    sim = sim.masked_fill(~same_frame, -float("inf"))
    assign = sim.argmax(-1)
    is_target = targets.reshape(-1)[members]
    own = torch.searchsorted(tgt, members.clamp(max=int(tgt.max())))
    assign = torch.where(is_target, own, assign)
    has_target = same_frame.any(-1)
    members, assign = members[has_target], assign[has_target]
    c = tgt.numel()
    sums = torch.zeros(c, x.shape[1], device=x.device).index_add_(0, assign, x[members])
    closeness = (x[members] * F.normalize(sums, dim=-1)[assign]).sum(-1)
    best = torch.full((c,), -float("inf"), device=x.device).scatter_reduce(0, assign, closeness, "amax")
    is_best = closeness >= best[assign]
    big = torch.full((c,), t * n, dtype=torch.long, device=x.device)
    return big.scatter_reduce(0, assign[is_best], members[is_best], "amin")


@register("visionzip")
class VisionZipSelector:
    """Per frame: dominant tokens by feature-norm saliency plus contextual cluster representatives (54:10)."""

    name = "visionzip"

    def __init__(self, dominant: int = DOMINANT, contextual: int = CONTEXTUAL) -> None:
        self.dominant_fraction = dominant / (dominant + contextual)

    def select(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        feats = video_features(ctx)
        t, n, _ = feats.shape
        shares = frame_shares(budget(retention, t * n), t, device=feats.device)
        n_dom = torch.floor(shares.double() * self.dominant_fraction + 0.5).long()
        dominant = _dominant_mask(feats.norm(dim=-1), n_dom)
        remaining = ~dominant
        targets = _target_mask(remaining, shares - n_dom)
        reps = _cluster_representatives(feats, remaining, targets)
        keep = torch.cat([dominant.reshape(-1).nonzero().squeeze(1), reps])
        return keep.sort().values.to(ctx.enc.inputs_embeds.device)
