"""Evaluation-time token selection from policy scores, as the official CaCoVID code does it (method.md,
"Evaluation-time selection"; official ``CompressionPolicy.sample_token_eval``).

For ``T`` frames of ``N = h * w`` tokens and retention ``r``:

1. Frame weights: frame scores scaled to max ``|3|``, softmaxed, clipped to ``[1/(2T), max_ratio / (T * r)]`` and
   renormalised (``max_ratio`` defaults to ``1.5 * r``, the official evaluation default, i.e. a ``1.5 / T`` cap).
2. Importance quotas: ``round(w_t * round(imp * r * h * w * T))`` (float32, half to even), clamped to
   ``[1, int(imp * h * w * max_ratio)]``; then, until the quotas sum to ``floor(imp * r * h * w * T)``, one token is
   taken from the first frame holding the largest quota, or given to the first frame holding the smallest. Two
   official quirks follow and are kept: a per-frame cap of 0 makes the clamp give 0 everywhere and the whole
   importance budget is handed out by that ``argmin`` loop from frame 0 on, whatever the frame scores; an overshoot is
   removed from the lowest-index largest frames first and can leave frames at quota 0.
3. Each frame takes its ``quota`` best tokens, ranked by ``softmax(0.001 * score)`` in float32 as the official code
   ranks them (ties, which float32 can create, go to the lower index).
4. Coverage (only when ``imp < 1``): the rest of ``B = floor(r * T * h * w)`` goes to positions
   ``round(linspace(0, M - 1, count))`` (float32 ``torch.linspace``, half to even) of the ``M`` tokens not yet taken,
   in (t, h, w) order.

Deliberate deviations, each only where the official code breaks down:
- All-zero frame scores give uniform frame weights (the official scaling divides by 0 and propagates NaN).
- The budget is at least one token (the official keeps none when ``r * T * N < 1``, or ``imp * r * T * N < 1`` with
  ``imp = 1``).
- If float32 ``linspace`` rounding ever repeats a coverage position (possible only when ``count`` is within a
  float32 ulp of ``M``), the exact integer spacing ``evenly_spaced`` is used instead, so the budget stays exact
  (the official would keep fewer tokens).

``h, w`` enter only through the official float expressions (``imp * r * h * w * T`` is not always ``imp * r * N * T``
in floating point); by default a square grid is assumed when ``N`` is a perfect square (LLaVA-OneVision: 14 x 14).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from cacovid_rl.types import PolicyScores


def _check_retention(retention: object) -> float:
    if isinstance(retention, bool) or not isinstance(retention, Real) or not 0.0 < float(retention) <= 1.0:
        raise ValueError(f"retention {retention!r} must be a number in (0, 1] (fraction of video tokens kept)")
    return float(retention)


def budget(retention: float, total: int) -> int:
    """Tokens kept at ``retention`` out of ``total``: ``floor(retention * total)``, at least 1.

    Raises ``ValueError`` naming the value when ``retention`` is NaN or outside (0, 1]. A 1e-9 slack absorbs
    float error (``0.29 * 100`` is ``28.999999999999996`` and must give 29). Used by the baselines;
    ``select_tokens`` uses the official expression instead (see the module docstring).
    """
    retention = _check_retention(retention)
    if total < 1:
        raise ValueError(f"cannot select from {total} video tokens; need at least 1")
    return int(min(total, max(1, math.floor(retention * total + 1e-9))))


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


def official_spaced(total: int, count: int) -> torch.LongTensor:
    """Positions ``round(linspace(0, total - 1, count))`` exactly as the official code computes them (CPU).

    float32 ``torch.linspace`` then round half to even; an x.5 position can therefore go either way. Falls back to
    ``evenly_spaced`` in the (float32-ulp) case where this would repeat a position.
    """
    if not 0 <= count <= total:
        raise ValueError(f"cannot pick {count} distinct positions out of {total}")
    pos = torch.linspace(0, total - 1, count, dtype=torch.float32).round().long()
    if count > 1 and not bool((pos.diff() > 0).all()):
        return evenly_spaced(total, count)
    return pos


def default_grid(n: int) -> tuple[int, int]:
    """``(h, w)`` of a frame of ``n`` tokens: the square grid when ``n`` is a perfect square, else ``(n, 1)``."""
    side = math.isqrt(n)
    return (side, side) if side * side == n else (n, 1)


def frame_weights(
    frame_scores: torch.Tensor, retention: float | None = None, max_ratio: float | None = None
) -> torch.Tensor:
    """Frame weights ``[T]`` (sum 1): scores scaled to max |3|, softmax, clipped, renormalised.

    The clip is ``[1/(2T), max_ratio / (T * retention)]`` (official); without ``max_ratio`` (the default
    ``1.5 * retention``) the upper bound is ``1.5 / T`` whatever the retention.
    """
    s = frame_scores.detach().float().reshape(-1)
    t = s.numel()
    peak = s.abs().max()
    s = s / peak * 3 if peak > 0 else torch.zeros_like(s)
    if max_ratio is None:
        upper = 1.5 / t if retention is None else 1 / (t * retention) * (1.5 * retention)
    else:
        if retention is None:
            raise ValueError("frame_weights needs the retention when max_ratio is given")
        upper = 1 / (t * retention) * max_ratio
    w = s.softmax(dim=-1).clip(min=1 / (2 * t), max=upper)
    return w / w.sum()


def importance_quotas(
    weights: torch.Tensor, retention: float, imp_ratio: float, max_ratio: float, grid_hw: tuple[int, int]
) -> list[int]:
    """Per-frame importance quotas (official clamp and +-1 loop); they sum to ``floor(imp * r * h * w * T)``.

    A quota can exceed the frame size when ``imp_ratio * max_ratio > 1``; the frame then gives all its tokens and
    the coverage step makes up the difference, as in the official code.
    """
    h, w = grid_hw
    t = weights.numel()
    # The float expressions keep the official operand order: floating-point products are not associative.
    target = round(imp_ratio * retention * h * w * t)
    cap = int(imp_ratio * h * w * max_ratio)
    quotas = (weights.float() * target).round().clip(min=1, max=cap).long().tolist()
    total = math.floor(imp_ratio * retention * h * w * t)
    if imp_ratio >= 1.0:
        total = max(1, total)  # the importance part is the whole selection: keep at least one token
    res = total - sum(quotas)
    # list.index(max(...)) is the first index of the maximum, like torch.argmax / argmin on CPU.
    while res < 0:
        quotas[quotas.index(max(quotas))] -= 1
        res += 1
    while res > 0:
        quotas[quotas.index(min(quotas))] += 1
        res -= 1
    return quotas


@dataclass(frozen=True)
class Selection:
    """One evaluation-time selection: all kept tokens and its importance part, as sorted flat indices."""

    keep: torch.LongTensor
    importance: torch.LongTensor
    quotas: list[int]
    num_coverage: int


def _check_inputs(scores: PolicyScores, imp_ratio: object, max_ratio: object) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(imp_ratio, bool) or not isinstance(imp_ratio, Real) or not 0.0 <= float(imp_ratio) <= 1.0:
        raise ValueError(f"imp_ratio {imp_ratio!r} must be a number in [0, 1]")
    if max_ratio is not None and (
        isinstance(max_ratio, bool) or not isinstance(max_ratio, Real) or not 0.0 < float(max_ratio) < math.inf
    ):
        raise ValueError(f"max_ratio {max_ratio!r} must be a positive number (per-frame cap factor)")
    token = scores.token.detach().float()
    frame = scores.frame.detach().float().reshape(-1)
    if token.dim() != 2 or frame.numel() != token.shape[0]:
        raise ValueError(f"token scores {tuple(token.shape)} and frame scores {tuple(frame.shape)} must be [T, N], [T]")
    for name, tensor in (("token scores", token), ("frame scores", frame)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contain NaN/inf; recompute the policy scores in float32 before selection")
    return token, frame


def select_tokens_detailed(
    scores: PolicyScores,
    retention: float,
    imp_ratio: float = 0.5,
    max_ratio: float | None = None,
    grid_hw: tuple[int, int] | None = None,
) -> Selection:
    """``select_tokens`` with its parts: importance tokens, per-frame quotas and the number of coverage tokens."""
    retention = _check_retention(retention)
    token, frame = _check_inputs(scores, imp_ratio, max_ratio)
    imp_ratio = float(imp_ratio)
    max_ratio = 1.5 * retention if max_ratio is None else float(max_ratio)
    t, n = token.shape
    h, w = default_grid(n) if grid_hw is None else grid_hw
    if h * w != n:
        raise ValueError(f"grid {h}x{w} does not hold the {n} tokens of a frame")
    device = token.device

    quotas = importance_quotas(frame_weights(frame, retention, max_ratio), retention, imp_ratio, max_ratio, (h, w))
    ranking = (token * 0.001).softmax(dim=-1)
    order = ranking.argsort(dim=-1, descending=True, stable=True)
    in_quota = torch.arange(n, device=device)[None, :] < torch.tensor(quotas, device=device)[:, None]
    selected = torch.zeros(t, n, dtype=torch.bool, device=device).scatter(1, order, in_quota).reshape(-1)
    importance = selected.nonzero().squeeze(1)

    num_coverage = 0
    keep = importance
    if imp_ratio < 1.0:
        total = max(1, math.floor(retention * t * h * w))
        num_coverage = max(0, total - importance.numel())
        free = (~selected).nonzero().squeeze(1)
        spread = free[official_spaced(free.numel(), num_coverage).to(device)]
        keep = torch.cat([importance, spread]).sort().values
    return Selection(keep=keep, importance=importance, quotas=quotas, num_coverage=num_coverage)


def select_tokens(
    scores: PolicyScores,
    retention: float,
    imp_ratio: float = 0.5,
    max_ratio: float | None = None,
    grid_hw: tuple[int, int] | None = None,
) -> torch.LongTensor:
    """Kept video tokens (sorted flat indices into the ``T * N`` block) for one question, as the official code.

    ``max_ratio`` is the official ``max_sample_ratio_for_each_frame`` (``None``: ``1.5 * retention``); ``grid_hw``
    the frame's token grid (``None``: square). ``floor(retention * T * N)`` tokens (at least 1) when
    ``imp_ratio < 1``; with ``imp_ratio == 1`` only the importance part, which sums to
    ``floor(retention * h * w * T)`` unless a quota exceeds its frame.
    """
    return select_tokens_detailed(scores, retention, imp_ratio, max_ratio, grid_hw).keep
