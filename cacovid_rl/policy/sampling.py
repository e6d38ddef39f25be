"""Online combination-space sampling for training (method.md, "Online combination-space sampling").

Every question gets ``G`` combinations in three modes, all keeping the same number ``K = T * k`` of
video tokens (``k = round(rate * N)`` per frame):

- **content** (``MODE_CONTENT``): per frame, the ``k`` tokens with the highest DPC-KNN density-peak
  score on the input features. Policy-free and deterministic.
- **token** (``MODE_TOKEN``): per frame, rank tokens by the policy's softmax, cut the ranking into
  contiguous bands, draw one band (capped band probabilities) and ``k`` tokens inside it without
  replacement (clamped in-band probabilities). Sample 0 is the deterministic per-frame top-k.
- **frame** (``MODE_FRAME``): draw ``ceil(t * frame_ratio)`` frames without replacement from the capped
  frame softmax (sample 0 = top frames) and spend the whole budget ``T * k`` inside them by DPC-KNN.

All randomness comes from one ``torch.Generator``; sampling is vectorised over frames and samples.
Randomness is drawn on the generator's device; results come back on the scores' device.

Choices where method.md is silent (also listed in the module functions' docstrings):
- DPC-KNN distances are divided by ``sqrt(D)`` (as in the reference DPC-KNN code): on LLM-width features
  raw squared distances are in the thousands and ``exp(-d^2)`` underflows to 0 for every token. The
  ``k`` nearest neighbours exclude the token itself, density ties are broken by index (no random noise),
  and rankings use the log-score so that an underflowing density never turns the ranking into ties.
- Capped probabilities (bands, frames) are capped by water-filling (the excess of a capped entry is
  redistributed proportionally over the others until nothing exceeds the cap), after a floor of
  ``1/n^2`` that keeps every band/frame reachable, exactly as the reference ``clip_max_probability``.
- The number of bands is limited to ``N // k`` so that every band holds at least ``k`` tokens.
- Frame samples force one token (its best DPC-KNN token) into every drawn frame, so that "frame kept"
  (any kept token, see ``rl.loss.frame_keep_masks``) equals "frame drawn". If the budget exceeds the
  drawn frames' capacity, the draw is extended (further frames drawn without replacement, top frames
  for sample 0) until the budget fits.
"""

from __future__ import annotations

import math

import torch

from cacovid_rl.config import SamplingConfig
from cacovid_rl.types import MODE_CONTENT, MODE_FRAME, MODE_TOKEN, Combinations, PolicyScores

_EPS = 1e-9
# Largest number of float32 entries a batched DPC-KNN distance tensor may hold (~256 MB).
_MAX_DIST_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------------------------------------------------
# validation helpers


def check_rate(rate: float) -> float:
    """Return ``rate`` as a float, or raise ``ValueError`` naming it when it is not in (0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate) or not 0.0 < rate <= 1.0:
        raise ValueError(f"sampling rate {rate!r} must be a number in (0, 1] (fraction of tokens kept per frame)")
    return float(rate)


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` when ``tensor`` holds NaN or inf, naming the tensor and what to check."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN/inf value(s); check the producer of this tensor (policy forward in "
            "bf16/fp16 overflowing, or corrupted video features) and recompute it in float32 before sampling"
        )


def tokens_per_frame(rate: float, n: int) -> int:
    """Tokens kept per frame, ``k = round(rate * n)`` clamped to ``[1, n]``."""
    rate = check_rate(rate)
    if n < 1:
        raise ValueError(f"tokens per frame n={n} must be >= 1")
    return int(min(max(round(rate * n), 1), n))


def num_bands(rate: float, group_size: int, n: int, k: int) -> int:
    """Number of rank bands, ``max(int(1 / rate / group_size), 1)``, at most ``n // k`` (each band holds >= k tokens).

    A tiny epsilon absorbs float error (``1 / 0.02 / 2`` must give 25, not 24).
    """
    groups = max(int(1.0 / rate / group_size + _EPS), 1)
    return max(1, min(groups, n // k))


# ----------------------------------------------------------------------------------------------------------------------
# probability helpers


def cap_probs(p: torch.Tensor, cap: float) -> torch.Tensor:
    """Cap each row of probabilities at ``cap`` by water-filling, after a ``1/n^2`` floor; rows sum to 1.

    Capped entries sit exactly at ``cap``; the mass they lose goes to the uncapped entries in proportion
    to their probability, repeated until no entry exceeds the cap (at most ``n`` rounds). When ``cap * n <= 1``
    the only feasible answer is uniform.
    """
    n = p.shape[-1]
    p = p.clamp(min=1.0 / n**2)
    p = p / p.sum(-1, keepdim=True)
    if cap >= 1.0:
        return p
    if cap * n <= 1.0:
        return torch.full_like(p, 1.0 / n)
    capped = torch.zeros_like(p, dtype=torch.bool)
    q = p
    for _ in range(n):
        free_mass = 1.0 - capped.sum(-1, keepdim=True) * cap
        free_sum = (p * ~capped).sum(-1, keepdim=True).clamp_min(1e-30)
        q = torch.where(capped, torch.full_like(p, cap), p * free_mass / free_sum)
        new_capped = capped | (q > cap * (1 + 1e-6))
        if torch.equal(new_capped, capped):
            break
        capped = new_capped
    return q


# ----------------------------------------------------------------------------------------------------------------------
# DPC-KNN


def _dpc_parts(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-density (``-mean squared distance to k neighbours``) and delta for ``[B, M, D]`` features, in float32."""
    x = features.float()
    b, m, d = x.shape
    if m == 1:
        return torch.zeros(b, 1, device=x.device), torch.ones(b, 1, device=x.device)
    dist = torch.cdist(x, x) / math.sqrt(d)
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    kk = min(k, m - 1)
    nearest = dist.masked_fill(eye, float("inf")).topk(kk, dim=-1, largest=False).values
    log_density = -(nearest**2).mean(-1)
    # "denser" = strictly higher density, ties broken by index (lower index counts as denser): a strict order.
    dens_j, dens_i = log_density[:, None, :], log_density[:, :, None]
    idx = torch.arange(m, device=x.device)
    denser = (dens_j > dens_i) | ((dens_j == dens_i) & (idx[None, :] < idx[:, None])[None])
    delta = dist.masked_fill(~denser, float("inf")).amin(-1)
    row_max = dist.amax(dim=(-1, -2), keepdim=False)[:, None].expand_as(delta)
    delta = torch.where(torch.isinf(delta), row_max, delta)
    return log_density, delta


def dpc_knn_scores(features: torch.Tensor, k: int = 4) -> torch.Tensor:
    """DPC-KNN density-peak score of every token, computed independently per leading index (frame).

    ``features`` is ``[T, N, D]``; returns ``[T, N]`` float32 scores ``density * delta`` where
    ``density = exp(-mean squared distance to the k nearest neighbours)`` (the token itself excluded, distances
    divided by ``sqrt(D)``) and ``delta`` is the distance to the nearest denser token (the largest distance in
    the frame for the densest one).
    """
    log_density, delta = _dpc_parts(features, k)
    return log_density.exp() * delta


def dpc_knn_log_scores(features: torch.Tensor, k: int = 4) -> torch.Tensor:
    """``log(dpc_knn_scores)`` computed without underflow: the ranking key used for selection."""
    log_density, delta = _dpc_parts(features, k)
    return log_density + delta.clamp_min(1e-30).log()


def content_sample(features: torch.Tensor, k_per_frame: int, knn_k: int = 4) -> torch.Tensor:
    """Per frame, the ``k_per_frame`` tokens with the highest DPC-KNN score: sorted flat indices ``[T * k]``."""
    t, n, _ = features.shape
    check_finite(features, "video features")
    if not 1 <= k_per_frame <= n:
        raise ValueError(f"k_per_frame={k_per_frame} must be in [1, {n}] (tokens per frame)")
    scores = dpc_knn_log_scores(features, knn_k)
    top = _stable_topk(scores, k_per_frame)
    flat = top + torch.arange(t, device=top.device)[:, None] * n
    return flat.reshape(-1).sort().values


def _stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row, ties broken by lower index (deterministic)."""
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :k]


# ----------------------------------------------------------------------------------------------------------------------
# token mode


def token_samples(
    token_scores: torch.Tensor,
    k_per_frame: int,
    num_samples: int,
    rate: float,
    group_size: int = 2,
    max_group_prob: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token-mode combinations ``[num_samples, T * k]`` (sorted flat indices); sample 0 is the per-frame top-k.

    Per frame: ``p = softmax(scores)``; tokens sorted by ``p`` are split into ``num_bands`` contiguous bands
    (the first ``N % G`` bands one token longer); band probability = its summed ``p``, capped at
    ``clip(max_group_prob / G, 0.1, 0.9)`` (1 when ``G == 1``) by water-filling; one band per (sample, frame)
    is drawn with replacement, then ``k`` tokens without replacement with in-band probabilities renormalised,
    clamped to ``[1/(2e), 2/e]`` (``e = N // G``) and renormalised again.
    """
    rate = check_rate(rate)
    check_finite(token_scores, "token scores")
    t, n = token_scores.shape
    if not 1 <= k_per_frame <= n:
        raise ValueError(f"k_per_frame={k_per_frame} must be in [1, {n}] (tokens per frame)")
    out_device = token_scores.device
    device = generator.device if generator is not None else out_device
    scores = token_scores.detach().float().to(device)
    order = scores.argsort(dim=-1, descending=True, stable=True)  # [T, N] token ids by rank
    offsets = torch.arange(t, device=device)[:, None] * n
    if num_samples <= 0:
        return torch.zeros(0, t * k_per_frame, dtype=torch.long, device=out_device)
    top = (order[:, :k_per_frame] + offsets).reshape(1, -1)
    if num_samples == 1:
        return top.sort(-1).values.to(out_device)

    s = num_samples - 1
    p_sorted = scores.softmax(-1).gather(-1, order)  # [T, N] descending
    g = num_bands(rate, group_size, n, k_per_frame)
    base, rem = divmod(n, g)
    sizes = torch.full((g,), base, dtype=torch.long, device=device)
    sizes[:rem] += 1
    band_of_rank = torch.repeat_interleave(torch.arange(g, device=device), sizes)  # [N]
    band_p = torch.zeros(t, g, device=device).index_add_(1, band_of_rank, p_sorted)
    cap = min(max(max_group_prob / g, 0.1), 0.9) if g > 1 else 1.0
    band_p = cap_probs(band_p, cap)
    bands = torch.multinomial(band_p, s, replacement=True, generator=generator).T  # [S, T]

    in_band = band_of_rank[None, None, :] == bands[:, :, None]  # [S, T, N] over ranks
    e = base
    q = p_sorted[None] * in_band
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
    q = q.clamp(1.0 / (2 * e), 2.0 / e) * in_band
    q = q / q.sum(-1, keepdim=True)
    ranks = torch.multinomial(q.reshape(s * t, n), k_per_frame, replacement=False, generator=generator)
    tokens = order.expand(s, t, n).reshape(s * t, n).gather(-1, ranks).reshape(s, t, k_per_frame)
    sampled = (tokens + offsets[None]).reshape(s, -1)
    return torch.cat([top, sampled]).sort(-1).values.to(out_device)


# ----------------------------------------------------------------------------------------------------------------------
# frame mode


def frames_per_sample(t: int, frame_ratio: float) -> int:
    """``ceil(t * frame_ratio)`` frames (at least 1, at most t), tolerant of float error (``10 * 0.3`` -> 3)."""
    if not 0.0 < frame_ratio <= 1.0:
        raise ValueError(f"frame_ratio {frame_ratio!r} must be in (0, 1]")
    return int(min(max(math.ceil(t * frame_ratio - 1e-6), 1), t))


def frame_samples(
    frame_scores: torch.Tensor,
    features: torch.Tensor,
    total_budget: int,
    num_samples: int,
    frame_ratio: float = 0.125,
    knn_k: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Frame-mode combinations ``[num_samples, total_budget]`` (sorted flat indices).

    Frame probabilities are the softmax of the frame scores capped at ``3/t``; each sample draws
    ``ceil(t * frame_ratio)`` frames without replacement (sample 0: the top-scored frames), extended when the
    budget does not fit in them. The budget is then spent on the drawn frames' tokens by DPC-KNN computed over
    their union (tokens compete across the drawn frames), with every drawn frame's best token forced in.
    """
    check_finite(frame_scores, "frame scores")
    check_finite(features, "video features")
    t, n, _ = features.shape
    frame_scores = frame_scores.reshape(-1)
    if frame_scores.numel() != t:
        raise ValueError(f"frame scores have {frame_scores.numel()} entries but the features have {t} frames")
    if not 1 <= total_budget <= t * n:
        raise ValueError(f"total_budget={total_budget} must be in [1, {t * n}] (all video tokens)")
    out_device = frame_scores.device
    if num_samples <= 0:
        return torch.zeros(0, total_budget, dtype=torch.long, device=out_device)
    m = max(frames_per_sample(t, frame_ratio), math.ceil(total_budget / n))
    m = min(m, total_budget)  # never more frames than tokens, so every drawn frame can keep one
    chosen = _draw_frames(frame_scores, m, num_samples, generator).to(features.device)  # [S, m]
    keep = _dpc_over_frames(features, chosen, total_budget, knn_k)
    return keep.to(out_device)


def _draw_frames(
    frame_scores: torch.Tensor, m: int, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``[S, m]`` frame ids, ascending per row: row 0 the top-m frames, the rest drawn without replacement."""
    device = generator.device if generator is not None else frame_scores.device
    scores = frame_scores.detach().float().to(device)
    t = scores.numel()
    rows = [_stable_topk(scores, m)[None]]
    if num_samples > 1:
        probs = cap_probs(scores.softmax(-1), 3.0 / t).expand(num_samples - 1, t)
        rows.append(torch.multinomial(probs, m, replacement=False, generator=generator))
    return torch.cat(rows).sort(-1).values


def _dpc_over_frames(features: torch.Tensor, chosen: torch.Tensor, budget: int, knn_k: int) -> torch.Tensor:
    """Top-``budget`` DPC-KNN tokens over the union of each row's frames (one forced per frame), flat and sorted."""
    s, m = chosen.shape
    _, n, d = features.shape
    size = m * n
    chunk = max(1, _MAX_DIST_ELEMENTS // (size * size))
    out = []
    for start in range(0, s, chunk):
        frames = chosen[start : start + chunk]  # [c, m]
        feats = features[frames].reshape(frames.shape[0], size, d)  # [c, m*N, D]
        scores = dpc_knn_log_scores(feats, knn_k).reshape(-1, m, n)
        best = scores.argmax(-1, keepdim=True)  # each frame's best token
        scores = scores.scatter(-1, best, float("inf")).reshape(-1, size)
        pos = _stable_topk(scores, budget)  # positions in the union
        flat = frames.gather(-1, pos // n) * n + pos % n
        out.append(flat.sort(-1).values)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------------
# all modes


def sample_combinations(
    scores: PolicyScores,
    features: torch.Tensor,
    rate: float,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Combinations:
    """All ``cfg.num_samples`` combinations of one question: content, then token, then frame samples.

    ``scores`` are the old policy's scores (``token [T, N]``, ``frame [T]``), ``features`` the video input
    features ``[T, N, D]``. Every row keeps ``K = T * round(rate * N)`` tokens, sorted.
    """
    rate = check_rate(rate)
    token, frame = scores.token.detach(), scores.frame.detach().reshape(-1)
    check_finite(token, "token scores")
    check_finite(frame, "frame scores")
    check_finite(features, "video features")
    if features.dim() != 3 or token.shape != features.shape[:2] or frame.numel() != features.shape[0]:
        raise ValueError(
            f"shape mismatch: token scores {tuple(token.shape)}, frame scores {tuple(frame.shape)}, "
            f"features {tuple(features.shape)}; expected [T, N], [T] and [T, N, D]"
        )
    t, n, _ = features.shape
    k = tokens_per_frame(rate, n)
    device = token.device
    content = content_sample(features, k, cfg.knn_k).to(device)[None].expand(cfg.num_content, -1)
    tok = token_samples(token, k, cfg.num_token, rate, cfg.group_size, cfg.max_group_prob, generator)
    frm = frame_samples(frame, features, t * k, cfg.num_frame, cfg.frame_ratio, cfg.knn_k, generator).to(device)
    keep = torch.cat([content, tok, frm]).contiguous()
    mode = torch.cat(
        [
            torch.full((cfg.num_content,), MODE_CONTENT, dtype=torch.long),
            torch.full((cfg.num_token,), MODE_TOKEN, dtype=torch.long),
            torch.full((cfg.num_frame,), MODE_FRAME, dtype=torch.long),
        ]
    ).to(device)
    return Combinations(keep=keep, mode=mode, rate=rate)
