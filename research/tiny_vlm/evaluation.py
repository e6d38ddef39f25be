"""Accuracy of the model under token selection, through the library's adapter and selectors.

Every synthetic answer is one token, so a question is answered right when the adapter's greedy first token
(``generate(..., max_new_tokens=1)``, the reward path's own decoding) is the answer. Each question is encoded
once (``adapter.encode``) and answered under every requested selection of that encoding:

- ``full``: no pruning;
- ``random``, ``uniform``, ``oracle``: the library's selectors (``cacovid_rl.baselines``; the oracle keeps the
  asked box's tokens, topped up with random ones);
- ``oracle_boxes``: the asked box topped up with the other boxes' tokens (what a question-aware policy that also
  keeps salient tokens keeps; the same draw as phase 2's box padding);
- ``saliency``: question-agnostic colour saliency, the cells with the most chroma (a stand-in for "keep the salient
  objects" that needs the synthetic grid, so it lives here and not among the library's baselines).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cacovid_rl.baselines import SelectionContext, budget, get_method
from cacovid_rl.data import synthetic
from cacovid_rl.models.llava_onevision import LlavaOnevisionAdapter
from cacovid_rl.types import EncodedQuestion
from research.tiny_vlm.data import EncodedSet
from research.tiny_vlm.losses import pruned_keep

LIBRARY_SELECTORS = ("random", "uniform", "oracle")
METHODS = ("full", *LIBRARY_SELECTORS, "oracle_boxes", "saliency")


def colour_saliency(frames: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` most colourful cells of ``[T, H, W, 3]`` uint8 frames (mean max-minus-min channel per cell),
    as flat video-token indices; ties go to the lower index."""
    t = frames.shape[0]
    f = frames.float().view(t, synthetic.GRID, synthetic.CELL, synthetic.GRID, synthetic.CELL, 3)
    chroma = (f.amax(-1) - f.amin(-1)).mean(dim=(2, 4)).reshape(-1)
    return torch.argsort(chroma, descending=True, stable=True)[:count]


def keep_for(
    method: str, enc: EncodedQuestion, data: EncodedSet, i: int, retention: float, generator: torch.Generator
) -> torch.Tensor | None:
    """Sorted kept video tokens ``[B]`` of question ``i`` under ``method`` (``None``: the full video)."""
    if method == "full":
        return None
    n = enc.num_video_tokens
    if method in LIBRARY_SELECTORS:
        ctx = SelectionContext(enc, generator=generator, oracle_tokens=data.oracle[i])
        return get_method(method).select(ctx, retention)
    if method == "oracle_boxes":
        keep = pruned_keep(data, i, budget(retention, n), n, None, generator, box_padding=1.0)
    elif method == "saliency":
        keep = colour_saliency(data.frames[i], budget(retention, n))
    else:
        raise ValueError(f"unknown selection method {method!r}; one of {METHODS}")
    return keep.sort().values


def _by_kind(correct: torch.Tensor, data: EncodedSet) -> dict[str, float]:
    """Accuracy overall and per question kind: the named box's colour, its dots, and the white-box prior."""
    n = correct.numel()
    prior = data.prior[:n]
    kinds = {
        "colour": torch.tensor([p == "multiple choice" for p in data.problem_types[:n]]) & ~prior,
        "prior": prior,
        "dots": torch.tensor([p == "numerical" for p in data.problem_types[:n]]) & ~prior,
    }
    out = {"accuracy": float(correct.float().mean())}
    for k, m in kinds.items():
        if m.any():
            out[k] = float(correct[m].float().mean())
    return out


def first_token_accuracy(
    adapter: LlavaOnevisionAdapter,
    data: EncodedSet,
    methods: Sequence[str] = ("full",),
    retention: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy of the first ``limit`` questions (all: ``None``) under each method at ``retention``.

    Each method draws from its own generator seeded with ``seed``, so a method's result does not depend on which
    other methods run beside it.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown selection method {m!r}; one of {METHODS}")
    adapter.model.eval()
    n = len(data) if limit is None else min(limit, len(data))
    gens = {m: torch.Generator().manual_seed(seed) for m in methods}
    correct = {m: torch.zeros(n, dtype=torch.bool) for m in methods}
    for i in range(n):
        enc = adapter.encode(data.frames[i].numpy(), data.prompts[i])
        for m in methods:
            keep = keep_for(m, enc, data, i, retention, gens[m])
            (text,) = adapter.generate(enc, None if keep is None else keep[None], max_new_tokens=1)
            correct[m][i] = text.strip() == data.answers[i]
    return {m: _by_kind(correct[m], data) for m in methods}


def text_only_accuracy(adapter: LlavaOnevisionAdapter, data: EncodedSet) -> dict[str, float]:
    """Accuracy without the video (the blind test's question): high on prior questions, near chance elsewhere."""
    adapter.model.eval()
    c = torch.tensor(
        [
            adapter.generate_text_only(p, max_new_tokens=1).strip() == a
            for p, a in zip(data.prompts, data.answers, strict=True)
        ]
    )
    out = {"all": float(c.float().mean())}
    if data.prior.any():
        out["prior"] = float(c[data.prior].float().mean())
        out["other"] = float(c[~data.prior].float().mean())
    return out
