"""Optimisation settings of the shipped run (docs/TINY_VLM.md says why each is what it is)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from research.tiny_vlm.scenes import Stage

DATA_SEED_OFFSET = 1
"""A generated training set uses seed ``DATA_SEED_OFFSET + seed``: sample ``i`` of a synthetic dataset depends
only on (seed, i), so equal seeds would share their first videos with the debug dataset (``make_synthetic(seed=0)``).
"""


@dataclass(frozen=True)
class PrunedStage:
    """Phase 2: a short fine-tune (fresh AdamW) on the train split where each step pairs the full-token batch
    with the same questions under a random pruning (the asked box kept, padded to a random budget).

    Why: trained on full tokens only, the model reads the asked box reliably among all 128 tokens but not among a
    few (with the box plus 7 other boxes, what a question-aware policy keeps at one token a frame, 0.68-0.92 per
    colour). A real frozen video LLM keeps answering from the informative tokens when the rest are dropped (what
    FastV and VisionZip rely on); this stage gives the stand-in that property, so the policy's reward measures
    whether it kept the right tokens, not the stand-in's fragility."""

    steps: int = 600
    lr: float = 3e-4
    warmup_steps: int = 10
    min_keep: float = 0.05
    max_keep: float = 0.5
    box_padding: float = 0.5
    """Share of pruned rows padded with other boxes (else random tokens)."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of the shipped run."""

    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    curriculum: tuple[Stage, ...] = (
        Stage(100, 0, 0, fill=True, text_only=False),
        Stage(200, 0, 0, min_boxes=2, max_boxes=2, box_span=8),
        Stage(300, 0, 0, min_boxes=2, max_boxes=5, box_span=4),
        Stage(300, 1, 2, asked_span=2),
        Stage(300, 2, 4),
    )
    """Stages before the train split: from reading a box that fills every cell of every frame (the
    answer in all 128 tokens, so the video pathway starts working) through two long-lived boxes and a
    few shorter ones, to boxes in every frame, then the real split (3-5 boxes a frame, the answer in
    one token)."""
    curriculum_size: int = 3000
    text_only_every: int = 8
    """Every N-th step is a text-only batch (question without video): teaches the blind prior."""
    eval_every: int = 250
    eval_size: int = 256
    attention_loss: float = 0.5
    """Weight of an auxiliary loss on one attention head (``attention_head`` of layer ``attention_layer``):
    minus the log of the attention mass the last prompt position puts on the asked box's tokens. It
    teaches the binding (find the named box) directly instead of waiting for it to emerge from the
    answer loss alone. The shipped model is still a plain LLaVA-OneVision; only its recipe uses it."""
    attention_layer: int = 1
    attention_head: int = 0
    pruned: PrunedStage = PrunedStage()

    def lr_at(self, step: int) -> float:
        """Linear warmup from ``lr / warmup_steps`` to ``lr``, then a half cosine down to ``min_lr_ratio * lr``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        p = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
