"""The compression interface shared by all baselines and the CaCoVID policy at evaluation.

Two kinds of method, one result type (``types.CompressedVideo``: the compressed video block of a question):

- a *selector* picks which video tokens survive: ``select(ctx, retention)`` returns ``LongTensor[B]`` of sorted,
  distinct flat indices into the ``T * N`` video block of ``ctx.enc``; its block is ``from_keep(enc, keep)``;
- a *merger* also averages tokens: ``compress(ctx, retention)`` returns the block directly (embeddings ``[B, D]``,
  positions ``[B]`` or ``[3, B]``, and which original tokens each output token covers).

Both keep exactly ``B = budget(retention, T * N) = floor(retention * T * N)`` (at least 1) output tokens, merged
tokens counting one each. ``compress(method, ctx, retention)`` gives the block of either kind. A merged token is
placed at the original position of one of its members, its *representative* (each method's docstring says which
one: e.g. a cluster's density peak or the earliest frame's token of a temporal chain), so positions are gathered
from the encoded question, never invented. Methods never modify ``ctx``.

This module holds no method: the registry (``registry.py``) maps names to classes and each method module
registers itself, so nothing here imports a method (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from cacovid_rl.policy.selection import budget
from cacovid_rl.types import CompressedVideo, EncodedQuestion, PolicyScores

__all__ = [
    "ORACLE",
    "CompressedVideo",
    "SelectionContext",
    "TokenCompressor",
    "TokenSelector",
    "budget",
    "build_block",
    "compress",
    "from_keep",
    "video_features",
    "video_positions",
]

ORACLE = "oracle"


@dataclass
class SelectionContext:
    """Everything a method may look at for one question.

    ``enc`` holds the video features ``[T, N, D]`` (``enc.video_features()``), their positions (1-D or M-RoPE
    ``[3, L]``) and the frame layout (``T`` frames of ``N`` tokens). ``adapter`` is the model adapter: FastV,
    PruneVid and FrameFusion ask it for early-layer attention (``adapter.early_layer_attention(enc, layer)``).
    ``scores`` are the CaCoVID policy's scores (only ``cacovid`` needs them), ``generator`` the randomness of
    ``random``, ``oracle_tokens`` the flat indices of the tokens known to hold the answer (only the ``oracle``
    reference needs them; the synthetic records carry them as ``meta.oracle_tokens``).
    """

    enc: EncodedQuestion
    adapter: object | None = None
    scores: PolicyScores | None = None
    generator: torch.Generator | None = None
    oracle_tokens: torch.Tensor | list[int] | None = None


@runtime_checkable
class TokenSelector(Protocol):
    name: str

    def select(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        """Sorted flat indices ``[B]`` of the kept video tokens, ``B = budget(retention, T * N)``."""
        ...


@runtime_checkable
class TokenCompressor(Protocol):
    name: str

    def compress(self, ctx: SelectionContext, retention: float) -> CompressedVideo:
        """The compressed video block of ``B = budget(retention, T * N)`` tokens (kept or merged)."""
        ...


def video_features(ctx: SelectionContext) -> torch.Tensor:
    """The question's video tokens as ``[T, N, D]`` float32 (the LLM-input features)."""
    return ctx.enc.video_features().detach().float()


def video_positions(enc: EncodedQuestion) -> torch.Tensor:
    """Position ids of the ``T * N`` video tokens: ``[T*N]`` (1-D) or ``[3, T*N]`` (M-RoPE)."""
    s, n = enc.video_start, enc.num_video_tokens
    pos = enc.position_ids
    return pos[s : s + n] if pos.dim() == 1 else pos[:, s : s + n]


def from_keep(enc: EncodedQuestion, keep: torch.Tensor) -> CompressedVideo:
    """The block of a selection: the kept tokens themselves at their own positions."""
    keep = keep.reshape(-1).long().sort().values.to(enc.inputs_embeds.device)
    total = enc.num_video_tokens
    assignment = torch.full((total,), -1, dtype=torch.long, device=keep.device)
    assignment[keep] = torch.arange(keep.numel(), device=keep.device)
    video = enc.inputs_embeds[enc.video_start : enc.video_start + total]
    pos = video_positions(enc).to(keep.device)
    return CompressedVideo(
        embeds=video[keep],
        positions=pos[keep] if pos.dim() == 1 else pos[:, keep],
        source=keep,
        assignment=assignment,
        kept=keep,
    )


def build_block(
    enc: EncodedQuestion, embeds: torch.Tensor, source: torch.Tensor, assignment: torch.Tensor
) -> CompressedVideo:
    """The block of a merging method, in video order.

    ``embeds`` ``[K, D]`` (any float dtype; cast to the model's), ``source`` ``[K]`` the representative token of
    each output token (its position is used), ``assignment`` ``[T*N]`` the output row (into ``embeds``) of every
    original token, -1 for dropped ones. Rows are reordered by ``source`` and ``assignment`` renumbered to match.
    Raises ``ValueError`` when two outputs share a representative or a representative is not its own member.
    """
    device = enc.inputs_embeds.device
    source = source.reshape(-1).long().to(device)
    assignment = assignment.reshape(-1).long().to(device)
    k = source.numel()
    if embeds.shape[0] != k:
        raise ValueError(f"{embeds.shape[0]} merged embeddings for {k} representatives")
    if assignment.numel() != enc.num_video_tokens:
        raise ValueError(f"assignment has {assignment.numel()} entries for {enc.num_video_tokens} video tokens")
    order = source.argsort()
    source = source[order]
    if k > 1 and bool((source[1:] == source[:-1]).any()):
        raise ValueError("two merged tokens share a representative position")
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=device)
    assignment = torch.where(assignment >= 0, rank[assignment.clamp_min(0)], assignment)
    if not bool((assignment[source] == torch.arange(k, device=device)).all()):
        raise ValueError("a merged token's representative is not one of its members")
    pos = video_positions(enc).to(device)
    return CompressedVideo(
        embeds=embeds[order].to(device=device, dtype=enc.inputs_embeds.dtype),
        positions=pos[source] if pos.dim() == 1 else pos[:, source],
        source=source,
        assignment=assignment,
        kept=None,
    )


def compress(method: object, ctx: SelectionContext, retention: float) -> CompressedVideo:
    """The compressed block of any method: a merger's ``compress``, or a selector's ``select`` via ``from_keep``."""
    if isinstance(method, TokenCompressor):
        return method.compress(ctx, retention)
    if isinstance(method, TokenSelector):
        return from_keep(ctx.enc, method.select(ctx, retention))
    raise TypeError(f"{type(method).__name__} has neither compress(ctx, retention) nor select(ctx, retention)")
