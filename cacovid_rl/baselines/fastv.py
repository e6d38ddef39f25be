"""FastV: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models" (Chen et al., ECCV 2024).

FastV observes that after the first couple of LLM layers most visual tokens receive almost no attention,
and prunes the visual tokens that receive the least attention at layer K=2. Here the ranking uses the
attention the *last* input token pays to each video token at layer 2 (``adapter.early_layer_attention``),
and the selection is applied at the LLM input like every other method in this package, so all methods are
compared at the same token budget.
"""

from __future__ import annotations

import torch

from cacovid_rl.baselines.base import SelectionContext, budget
from cacovid_rl.baselines.registry import register


@register("fastv")
class FastVSelector:
    """Keeps the ``B`` video tokens with the highest last-token attention at LLM layer ``layer`` (default 2)."""

    name = "fastv"

    def __init__(self, layer: int = 2) -> None:
        self.layer = layer

    def select(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        total = ctx.enc.num_video_tokens
        b = budget(retention, total)
        fn = getattr(ctx.adapter, "early_layer_attention", None)
        if fn is None:
            raise ValueError("fastv needs ctx.adapter with early_layer_attention(enc, layer); got no such adapter")
        attn = torch.as_tensor(fn(ctx.enc, layer=self.layer)).detach().float().reshape(-1)
        if attn.numel() != total:
            raise ValueError(f"early_layer_attention returned {attn.numel()} values for {total} video tokens")
        if not torch.isfinite(attn).all():
            raise ValueError("early_layer_attention returned NaN/inf; run the adapter in float32 or check the model")
        top = attn.argsort(descending=True, stable=True)[:b]
        return top.sort().values.to(ctx.enc.inputs_embeds.device)
