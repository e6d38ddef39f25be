"""Data types shared across the library: the contracts between data, models, policy and RL code.

Conventions used everywhere:
- A question's video occupies one contiguous block of ``T * N`` tokens in the LLM input sequence,
  starting at ``EncodedQuestion.video_start``, in (frame, row, column) order. ``T`` is the number of
  policy "frames" (temporal groups for Qwen2.5-VL) and ``N`` the tokens per frame.
- A *combination* (a set of kept tokens) is a sorted LongTensor of flat indices in ``[0, T*N)``.
  All ``G`` combinations of one question keep the same number ``K`` of tokens, so they stack as
  a ``[G, K]`` tensor and batch without padding.
- Sample modes: ``MODE_CONTENT`` (DPC-KNN, policy-free), ``MODE_TOKEN`` and ``MODE_FRAME``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODE_CONTENT = 0
MODE_TOKEN = 1
MODE_FRAME = 2
MODE_NAMES = {MODE_CONTENT: "content", MODE_TOKEN: "token", MODE_FRAME: "frame"}


@dataclass
class EncodedQuestion:
    """One question with its video encoded once: everything needed to score combinations and run the policy.

    ``inputs_embeds`` is the full LLM input sequence (template text, all video tokens, trailing
    extras such as LLaVA's ``image_newline``, question, generation prompt).
    ``position_ids`` holds the positions of the full sequence: shape ``[L]`` (1-D RoPE) or ``[3, L]``
    (Qwen2.5-VL M-RoPE). Pruning gathers columns; positions are never recomputed.
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    video_start: int
    num_frames: int
    tokens_per_frame: int
    input_ids: torch.Tensor | None = None

    @property
    def num_video_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def seq_len(self) -> int:
        return int(self.inputs_embeds.shape[0])

    def video_features(self) -> torch.Tensor:
        """Video tokens as ``[T, N, D]`` (a view of ``inputs_embeds``)."""
        s = self.video_start
        return self.inputs_embeds[s : s + self.num_video_tokens].view(self.num_frames, self.tokens_per_frame, -1)

    def kept_sequence_index(self, keep: torch.Tensor) -> torch.Tensor:
        """Sequence indices of the LLM input when only ``keep`` (``[..., K]`` flat video indices) survive.

        Text and non-video tokens (e.g. ``image_newline``) are always kept. Returns ``[..., L - T*N + K]``.
        """
        s, n = self.video_start, self.num_video_tokens
        device = keep.device
        before = torch.arange(0, s, device=device)
        after = torch.arange(s + n, self.seq_len, device=device)
        lead = keep.shape[:-1]
        parts = [before.expand(*lead, s), keep + s, after.expand(*lead, after.numel())]
        return torch.cat(parts, dim=-1)


@dataclass
class PolicyScores:
    """Bernoulli log-odds of keeping each video token (``[T, N]``) and each frame (``[T]``)."""

    token: torch.Tensor
    frame: torch.Tensor


@dataclass
class Combinations:
    """``G`` sampled token combinations of one question: ``keep`` ``[G, K]`` sorted flat indices, ``mode`` ``[G]``.

    ``frame_mask`` ``[G, T]`` (bool) is what the frame loss counts as a kept frame: for frame-mode rows the frames
    that were *drawn* (as the official loss does, even when DPC-KNN then gives a drawn frame no token), for the
    other rows the frames holding any kept token. ``None`` means "derive from ``keep``" (frames with a kept token).
    """

    keep: torch.Tensor
    mode: torch.Tensor
    rate: float = 0.0
    frame_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.keep.shape[0])


@dataclass
class QuestionMemory:
    """Every combination sampled for one question so far, across its iterations, with its reward.

    ``iteration[i]`` says in which iteration (0-based) sample ``i`` was drawn, so the learner can take
    the optimiser step of iteration ``j`` on ``iteration <= j`` exactly as the single-process method does.
    """

    keep: list[torch.Tensor] = field(default_factory=list)
    mode: list[torch.Tensor] = field(default_factory=list)
    rewards: list[torch.Tensor] = field(default_factory=list)
    iteration: list[torch.Tensor] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    frame_mask: list[torch.Tensor | None] = field(default_factory=list)

    def append(self, combos: Combinations, rewards: torch.Tensor) -> None:
        it = len(self.rates)
        self.keep.append(combos.keep)
        self.mode.append(combos.mode)
        self.frame_mask.append(combos.frame_mask)
        self.rewards.append(rewards.float())
        self.iteration.append(torch.full((len(combos),), it, dtype=torch.long))
        self.rates.append(combos.rate)


@dataclass
class CompressedVideo:
    """The video block of one question after compression: what the LLM reads in place of the ``T * N`` tokens.

    ``embeds`` ``[K, D]`` are the kept or merged token embeddings (merged tokens are averages of their members),
    ``positions`` ``[K]`` (1-D RoPE) or ``[3, K]`` (M-RoPE) their position ids: each output token takes the
    original position of its ``source`` token (``[K]``, flat indices into ``[0, T*N)``, strictly increasing, so
    the block keeps the video's order). ``assignment`` ``[T*N]`` says which output slot every original token went
    to (-1: dropped), so a caller can tell which tokens a merged token covers. ``kept`` is the sorted kept indices
    (``[K]``) for selection methods, whose block is exactly ``embeds = video[kept]``, and ``None`` for methods that
    merge. All rows answered together for one question have the same ``K`` (they batch without padding).
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    source: torch.Tensor
    assignment: torch.Tensor
    kept: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def is_selection(self) -> bool:
        return self.kept is not None

    def covered(self) -> torch.Tensor:
        """Sorted flat indices of every original token that survives, kept itself or merged into an output token."""
        return (self.assignment >= 0).nonzero().flatten()
