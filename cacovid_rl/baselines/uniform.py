"""Uniform selection: tokens evenly spaced over the video in (t, h, w) order (the coverage-only baseline)."""

from __future__ import annotations

import torch

from cacovid_rl.baselines.base import SelectionContext, budget
from cacovid_rl.baselines.registry import register
from cacovid_rl.policy.selection import evenly_spaced


@register("uniform")
class UniformSelector:
    """Keeps ``round(linspace(0, T*N - 1, B))``: every frame and region equally, ignoring content."""

    name = "uniform"

    def select(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        total = ctx.enc.num_video_tokens
        return evenly_spaced(total, budget(retention, total), device=ctx.enc.inputs_embeds.device)
