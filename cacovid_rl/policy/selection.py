"""Evaluation-time token selection from policy scores (method.md, "Evaluation-time selection").

Budget ``B = floor(retention * T * N)``. An importance part (``imp_ratio * B`` tokens) is split into per-frame
quotas by frame weights and filled with each frame's top-scored tokens; the rest of the budget is spread
evenly (linspace) over the not-yet-selected tokens in (t, h, w) order for coverage.

Choices where method.md is silent:
- Frame weights: frame scores are divided by their max absolute value and multiplied by 3 (all-zero scores
  give uniform weights), softmaxed, clipped to ``[1/(2t), 1.5/t]`` and renormalised. (The reference code
  clips at ``0.5 / (t * retention)``; method.md's ``1.5/t`` is followed here.)
- Quotas: ``floor(min(w_t * B_imp, cap))`` with ``cap = min(N, ceil(1.5 * B_imp / t))``, then the missing
  tokens are handed out one at a time, largest remainder ``w_t * B_imp - q_t`` first, to frames below the cap.
  The sum is exactly ``B_imp = floor(imp_ratio * B)``.
- Evenly spread positions use exact integer rounding of ``linspace(0, M - 1, count)``, which never repeats
  a position when ``count <= M``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from cacovid_rl.types import PolicyScores


def budget(retention: float, total: int) -> int:
    """Tokens kept at ``retention`` out of ``total``: ``floor(retention * total)``, at least 1.

    Raises ``ValueError`` naming the value when ``retention`` is NaN or outside (0, 1]. A 1e-9 slack absorbs
    float error (``0.29 * 100`` is ``28.999999999999996`` and must give 29).
    """
    if isinstance(retention, bool) or not isinstance(retention, Real) or not 0.0 < float(retention) <= 1.0:
        raise ValueError(f"retention {retention!r} must be a number in (0, 1] (fraction of video tokens kept)")
    if total < 1:
        raise ValueError(f"cannot select from {total} video tokens; need at least 1")
    return int(min(total, max(1, math.floor(float(retention) * total + 1e-9))))


def evenly_spaced(total: int, count: int, device: torch.device | str | None = None) -> torch.LongTensor:
    """``count`` distinct positions in ``[0, total)``: ``round(linspace(0, total - 1, count))`` in integers."""
    if not 0 <= count <= total:
        raise ValueError(f"cannot pick {count} distinct positions out of {total}")
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if count == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    i = torch.arange(count, dtype=torch.long, device=device)
    # round(i * (total - 1) / (count - 1)) with halves rounded up, exactly.
    return (2 * i * (total - 1) + (count - 1)) // (2 * (count - 1))


def frame_weights(frame_scores: torch.Tensor) -> torch.Tensor:
    """Frame weights ``[T]`` (sum 1): scores scaled to max |3|, softmax, clipped to [1/(2t), 1.5/t], renormalised."""
    s = frame_scores.detach().float().reshape(-1)
    t = s.numel()
    peak = s.abs().max()
    s = s / peak * 3.0 if peak > 0 else torch.zeros_like(s)
    w = s.softmax(-1).clamp(1.0 / (2 * t), 1.5 / t)
    return w / w.sum()


def frame_quotas(weights: torch.Tensor, total: int, per_frame: int) -> torch.LongTensor:
    """Split ``total`` tokens over frames by ``weights``, each quota at most ``min(per_frame, ceil(1.5 * mean))``."""
    t = weights.numel()
    if total <= 0:
        return torch.zeros(t, dtype=torch.long, device=weights.device)
    if total > t * per_frame:
        raise ValueError(f"cannot place {total} tokens in {t} frames of {per_frame}")
    cap = min(per_frame, math.ceil(1.5 * total / t - 1e-9))
    target = weights.double() * total
    q = target.clamp(max=cap).floor().long()
    deficit = total - int(q.sum())
    while deficit > 0:
        room = q < cap
        priority = torch.where(room, target - q, torch.full_like(target, -math.inf))
        n = min(deficit, int(room.sum()))
        idx = priority.argsort(descending=True, stable=True)[:n]
        q[idx] += 1
        deficit -= n
    return q


def select_tokens(scores: PolicyScores, retention: float, imp_ratio: float = 0.5) -> torch.LongTensor:
    """Kept video tokens ``[B]`` (sorted flat indices into the ``T * N`` block) for one question.

    ``imp_ratio`` of the budget goes to per-frame top-scored tokens under frame-weighted quotas, the rest is
    spread evenly over the remaining tokens in (t, h, w) order. Exact budget, no duplicates.
    """
    if isinstance(imp_ratio, bool) or not isinstance(imp_ratio, Real) or not 0.0 <= float(imp_ratio) <= 1.0:
        raise ValueError(f"imp_ratio {imp_ratio!r} must be a number in [0, 1]")
    token = scores.token.detach().float()
    frame = scores.frame.detach().float().reshape(-1)
    if token.dim() != 2 or frame.numel() != token.shape[0]:
        raise ValueError(f"token scores {tuple(token.shape)} and frame scores {tuple(frame.shape)} must be [T, N], [T]")
    for name, tensor in (("token scores", token), ("frame scores", frame)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contain NaN/inf; recompute the policy scores in float32 before selection")
    t, n = token.shape
    b = budget(retention, t * n)
    b_imp = math.floor(float(imp_ratio) * b)
    quotas = frame_quotas(frame_weights(frame), b_imp, n)
    order = token.argsort(dim=-1, descending=True, stable=True)
    taken = torch.arange(n, device=token.device)[None, :] < quotas[:, None]  # in rank space
    selected = torch.zeros(t, n, dtype=torch.bool, device=token.device).scatter(1, order, taken).reshape(-1)
    free = (~selected).nonzero().squeeze(1)
    spread = free[evenly_spaced(free.numel(), b - b_imp, device=token.device)]
    return torch.cat([selected.nonzero().squeeze(1), spread]).sort().values
