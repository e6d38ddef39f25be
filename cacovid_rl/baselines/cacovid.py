"""CaCoVID at evaluation: the trained policy's scores through ``policy.selection.select_tokens``."""

from __future__ import annotations

import torch

from cacovid_rl.baselines.base import SelectionContext
from cacovid_rl.baselines.registry import register
from cacovid_rl.policy.selection import select_tokens


@register("cacovid")
class CacovidSelector:
    """Frame-weighted importance quotas on the policy's token scores plus even coverage (method.md).

    ``max_ratio_scale`` is the official ``max_sample_ratio_for_each_frame`` as a multiple of the retention.
    """

    name = "cacovid"

    def __init__(self, imp_ratio: float = 0.5, max_ratio_scale: float = 1.5) -> None:
        self.imp_ratio = imp_ratio
        self.max_ratio_scale = max_ratio_scale

    def select(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        if ctx.scores is None:
            raise ValueError("the cacovid selector needs policy scores: set SelectionContext.scores = policy(enc)")
        t, n = ctx.enc.num_frames, ctx.enc.tokens_per_frame
        if tuple(ctx.scores.token.shape) != (t, n):
            raise ValueError(f"policy token scores {tuple(ctx.scores.token.shape)} do not match the video ({t}, {n})")
        keep = select_tokens(ctx.scores, retention, self.imp_ratio, max_ratio=self.max_ratio_scale * retention)
        return keep.to(ctx.enc.inputs_embeds.device)
