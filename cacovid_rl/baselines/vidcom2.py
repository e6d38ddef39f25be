"""VidCom2: "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large Language Models"
(Liu, Wang, Chen, Yu, Tao, Zhang, Wang, Zhang; EMNLP 2025; arXiv 2505.14454; merged into vLLM as
``--video-retention-ratio``).

VidCom2 gives frames with more *unique* content a larger share of the budget, then keeps each frame's most
distinctive tokens. From the public code (``llava/model/vidcom2.py``), with its defaults:

- channels: the half of the feature channels with the lowest variance over all video tokens (``ratio=0.5``);
- on those channels (L2-normalised per token), each token's multi-scale Gaussian similarity to the video mean
  and to its frame's mean, ``sum_a exp(-||x - c||^2 / (2a))`` over ``a in {1/8, 1/4, 1/2, 1, 2}``;
- frame uniqueness ``u_t = -mean_n sim_video``; frame weights ``1 + p_t - mean(p)`` with ``p = softmax(u / 0.01)``
  (``temp=0.01``), so the most unique frames get up to twice the base share;
- per frame, the tokens with the *lowest* ``sim_video + sim_frame`` (outliers: unique within the video and the
  frame) are kept.

Budget: the published code keeps ``round(retention * weight_t * N)`` per frame (about ``B``, not exactly); here
``B = budget(retention, T*N)`` is split over frames in proportion to the same weights by largest remainder, each
frame at most ``N`` tokens and at least one while ``B >= T``. A selection method (no merging): it works on the
LLM-input features, as the published one does (after the projector and pooling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cacovid_rl.baselines.base import SelectionContext, budget, video_features
from cacovid_rl.baselines.common import allocate
from cacovid_rl.baselines.registry import register

ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)


def _gaussian_similarity(x: torch.Tensor, centre: torch.Tensor, alphas: tuple[float, ...]) -> torch.Tensor:
    sq = ((x - centre) ** 2).sum(-1)
    return sum(torch.exp(-sq / (2 * a)) for a in alphas)


def vidcom2_scores(
    feats: torch.Tensor, channel_ratio: float = 0.5, temperature: float = 0.01, alphas: tuple[float, ...] = ALPHAS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame weights ``[T]`` (mean 1) and token scores ``[T, N]`` (lower = more distinctive) of ``feats [T, N, D]``."""
    t, n, d = feats.shape
    flat = feats.reshape(t * n, d).float()
    k = max(1, int(d * channel_ratio))
    channels = flat.var(dim=0, unbiased=False).argsort(stable=True)[:k]
    x = F.normalize(flat[:, channels].reshape(t, n, k), dim=-1)
    sim_video = _gaussian_similarity(x, x.mean(dim=(0, 1), keepdim=True), alphas)
    sim_frame = _gaussian_similarity(x, x.mean(dim=1, keepdim=True), alphas)
    uniqueness = -sim_video.mean(-1)
    p = torch.softmax((uniqueness - uniqueness.max()) / temperature, dim=0)
    return 1 + p - p.mean(), sim_video + sim_frame


@register("vidcom2")
class VidCom2Selector:
    """Frame-uniqueness budgets, then each frame's least typical tokens (see the module docstring)."""

    name = "vidcom2"

    def __init__(self, channel_ratio: float = 0.5, temperature: float = 0.01) -> None:
        self.channel_ratio = channel_ratio
        self.temperature = temperature

    def frame_budgets(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        """Tokens kept per frame ``[T]`` (sums to ``B``)."""
        feats = video_features(ctx)
        t, n, _ = feats.shape
        weights, _ = vidcom2_scores(feats, self.channel_ratio, self.temperature)
        return allocate(budget(retention, t * n), weights, torch.full((t,), n), minimum=1)

    def select(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        feats = video_features(ctx)
        t, n, _ = feats.shape
        weights, token_scores = vidcom2_scores(feats, self.channel_ratio, self.temperature)
        counts = allocate(budget(retention, t * n), weights, torch.full((t,), n), minimum=1)
        order = token_scores.argsort(dim=-1, stable=True)  # ascending: most distinctive first
        keep = [order[f, : int(c)] + f * n for f, c in enumerate(counts.tolist()) if c > 0]
        return torch.cat(keep).sort().values.to(ctx.enc.inputs_embeds.device)
