"""Random selection: a uniformly random subset of the video tokens (seeded)."""

from __future__ import annotations

import torch

from cacovid_rl.baselines.base import SelectionContext, budget
from cacovid_rl.baselines.registry import register


@register("random")
class RandomSelector:
    """Uniformly random ``B`` tokens from ``ctx.generator``; without one, a fixed ``seed`` keeps runs reproducible."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def select(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        total = ctx.enc.num_video_tokens
        b = budget(retention, total)
        gen = ctx.generator if ctx.generator is not None else torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(total, generator=gen, device=gen.device)
        return perm[:b].sort().values.to(ctx.enc.inputs_embeds.device)
