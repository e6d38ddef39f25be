"""Oracle selection: the tokens known to hold the answer, topped up to the budget (an upper reference, not a method).

Needs ``SelectionContext.oracle_tokens``: flat indices into the ``T * N`` video block of the tokens the answer
depends on (the synthetic data's ``meta.oracle_tokens``). The first ``B`` of them are kept (all of them when
they fit), and the rest of the budget is filled with uniformly random other tokens from ``ctx.generator``,
the definition the shipped tiny model's training report uses (its recipe, ``research/tiny_vlm``, selects with
this class), so the two are comparable. A question whose answer depends on no token (a count of zero) keeps
``B`` random tokens.
"""

from __future__ import annotations

import torch

from cacovid_rl.baselines.base import SelectionContext, budget
from cacovid_rl.baselines.registry import register


@register("oracle")
class OracleSelector:
    """Keeps ``ctx.oracle_tokens`` (truncated to the budget), padded with random other tokens."""

    name = "oracle"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def select(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        total = ctx.enc.num_video_tokens
        b = budget(retention, total)
        if ctx.oracle_tokens is None:
            raise ValueError("the oracle selector needs SelectionContext.oracle_tokens (the record's answer tokens)")
        must = torch.as_tensor(ctx.oracle_tokens, dtype=torch.long).reshape(-1).cpu()
        if must.numel() and (int(must.min()) < 0 or int(must.max()) >= total):
            raise ValueError(f"oracle tokens span [{int(must.min())}, {int(must.max())}], outside [0, {total})")
        must = torch.unique(must, sorted=False)[:b] if must.numel() else must
        gen = ctx.generator if ctx.generator is not None else torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(total, generator=gen, device=gen.device).cpu()
        rest = perm[~torch.isin(perm, must)][: b - must.numel()]
        return torch.cat([must, rest]).sort().values.to(ctx.enc.inputs_embeds.device)
