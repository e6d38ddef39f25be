"""Online combination-space sampling for training, as the official CaCoVID code does it (method.md, "Online
combination-space sampling"; official ``CompressionPolicy.sample_content / sample_token / sample_frame``).

Every question gets ``G`` combinations in three modes, all keeping the same number ``K = T * k`` of
video tokens (``k = round(rate * N)`` per frame):

- **content** (``MODE_CONTENT``): per frame, the ``k`` tokens with the highest DPC-KNN density-peak
  score on the input features. Policy-free and deterministic.
- **token** (``MODE_TOKEN``): per frame, rank tokens by the policy's softmax, cut the ranking into
  contiguous bands, draw one band (capped band probabilities) and ``k`` tokens inside it without
  replacement (clamped in-band probabilities). Sample 0 is the deterministic per-frame top-k.
- **frame** (``MODE_FRAME``): draw ``ceil(t * frame_ratio)`` frames without replacement (sample 0 = top
  frames) and spend the whole budget ``T * k`` inside them by one DPC-KNN over their union. A drawn frame can
  end up with no token; it still counts as drawn (``Combinations.frame_mask``), as in the official loss.

All randomness comes from one ``torch.Generator``; sampling is vectorised over frames and samples.
Randomness is drawn on the generator's device; results come back on the scores' device.

Official details reproduced:
- DPC-KNN: float32 ``torch.cdist`` (one call per matrix, as the official, so the >25-row matrix-multiply path
  and its nonzero self-distance are the same) divided by ``sqrt(D)``; the 4 nearest neighbours include the
  token itself; density ``exp(-mean d^2)``; delta = distance to the nearest strictly denser token, the
  global maximum distance when there is none; score ``delta * density``. The official 1e-6 density jitter is
  not added (it changes none of the golden cases); equal float32 densities are told apart by the exact
  log-density instead, and equal scores (all 0 when the density underflows on wide features) by the
  log-score, then by index.
- ``clip_max_probability``: the official recursive cap, with its ``1/len(p)^2`` floor (``len`` = first
  dimension) re-applied at every level and a 2-D input treated as one flat distribution (``clip_max_probability``
  below is a faithful port; ``cap_probs`` is the same for independent 1-D rows, vectorised).
- Token mode: ``num_group = max(int(1 / rate / group_size), 1)`` bands, the first ``N % num_group`` one token
  longer; band cap ``clip(max_group_prob / num_group, 0.1, 0.9)`` (1 for one band); in-band probabilities
  divided by ``sum + 1e-8``, clamped to ``[1/(2e), 2/e]`` (``e = N // num_group``), masked and divided by
  ``sum + 1e-8`` again (a band holding almost no mass is therefore sampled almost uniformly).
- Frame mode (``frame_cap="official"``): the official applies its 3/t cap to the ``[num_frame, t]`` matrix of
  repeated softmaxes, so for t <= 32 frames are drawn from ``max(softmax, 1/num_frame^2)`` renormalised;
  for larger t the cap can bind and then row ``j`` (``j`` = the capped frame's index) of the matrix changes.

Deliberate deviations (each only where the official code raises or returns no tokens):
- ``k = round(rate * N)`` is at least 1 (the official keeps 0 tokens per frame below ``rate * N = 0.5``).
- The number of bands is at most ``N // k``: with more bands some band holds fewer than ``k`` tokens and the
  official ``torch.multinomial`` (or its ``num_group <= N`` assert) fails when that band is drawn.
- A probability cap below ``1/n`` gives the uniform distribution (the official asserts).
- Frame mode, ``frame_cap="official"``: where the official ``clip_max_probability`` raises ``IndexError`` (the cap
  binds on a frame whose index is >= ``num_frame``, e.g. t=48 with a dominant frame 27), the per-frame 3/t cap
  (``frame_cap="per_frame"``) is used for that question.
- Frame mode: when the budget ``T * k`` exceeds the drawn frames' tokens (rates above about ``frame_ratio``),
  more frames are drawn (without replacement; the next top frames for sample 0) until it fits; the official
  ``torch.topk`` raises there.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from cacovid_rl.config import SamplingConfig
from cacovid_rl.types import MODE_CONTENT, MODE_FRAME, MODE_TOKEN, Combinations, PolicyScores

# Largest number of float32 entries a batched DPC-KNN distance tensor may hold (~256 MB).
_MAX_DIST_ELEMENTS = 1 << 26
# The official in-band normalisation adds this to the denominator.
_BAND_EPS = 1e-8

FrameCap = Literal["official", "per_frame"]


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
    """Tokens kept per frame, ``k = round(rate * n)`` (Python rounding, as the official) clamped to ``[1, n]``."""
    rate = check_rate(rate)
    if n < 1:
        raise ValueError(f"tokens per frame n={n} must be >= 1")
    return int(min(max(round(rate * n), 1), n))


def num_bands(rate: float, group_size: int, n: int, k: int) -> int:
    """Number of rank bands: the official ``max(int(1 / rate / group_size), 1)``, at most ``n // k``.

    The ``n // k`` limit only binds where a band would hold fewer than ``k`` tokens (the official then fails).
    """
    groups = max(int(1 / rate / group_size), 1)
    return max(1, min(groups, n // k))


def band_cap(num_group: int, max_group_prob: float) -> float:
    """Largest band probability: ``clip(max_group_prob / num_group, 0.1, 0.9)``, 1 for a single band (official)."""
    return max(min(max_group_prob / num_group, 0.9), 0.1) if num_group > 1 else 1.0


# ----------------------------------------------------------------------------------------------------------------------
# probability capping


class ClipError(ValueError):
    """The official ``clip_max_probability`` would raise here (its ``IndexError`` or ``AssertionError``)."""


def clip_max_probability(p: torch.Tensor, max_prob: float) -> torch.Tensor:
    """Faithful port of the official ``sample_utils.clip_max_probability`` (any number of dimensions).

    The floor is ``1 / p.shape[0]**2`` and is re-applied at every recursion level; ``p`` is normalised as one flat
    distribution; the capped entry is the flat ``argmax`` but it is masked and overwritten through ``mask[j]`` /
    ``out[j]``, which for a 2-D input is the whole row ``j``. Not renormalised (the official callers renormalise or
    pass it to ``torch.multinomial``). Raises ``ClipError`` where the official raises (row ``j`` does not exist, or
    ``max_prob`` is below ``1 / (number of entries)``).
    """
    return _clip_level(p.float(), max_prob, None)


def _clip_level(p: torch.Tensor, max_prob: float, mask: torch.Tensor | None) -> torch.Tensor:
    p = p.clamp(min=1 / p.shape[0] ** 2)
    if mask is None:
        p = p / p.sum()
        mask = torch.ones_like(p)
    else:
        p = torch.where(mask.bool(), p, torch.zeros_like(p))
        p = p / (p * mask).sum()
    if int((mask == 1).sum()) == 1:
        return p
    max_prob = min(max_prob, 0.999)
    # Comparisons are made on float32 tensors, as the official ones are (the Python float is rounded to float32).
    if not bool(max_prob * mask.sum() > 1.0):
        raise ClipError(f"max_prob {max_prob} is below 1/{int(mask.sum())}: no distribution satisfies the cap")
    if bool(p.max() <= max_prob):
        return p
    j = int(p.argmax())
    if j >= mask.shape[0]:
        raise ClipError(f"index {j} is out of bounds for dimension 0 with size {mask.shape[0]} (official IndexError)")
    mask = mask.clone()
    mask[j] = 0
    rest = 1 - max(min(max_prob, 0.999), 0.001)
    out = _clip_level(p, max_prob / rest, mask) * rest
    out[j] = max_prob
    return out


def cap_probs(p: torch.Tensor, cap: float) -> torch.Tensor:
    """The official ``clip_max_probability`` applied to every row of ``p`` ``[R, n]`` independently, renormalised.

    Vectorised over rows; each row gets exactly the official 1-D recursion (floor ``1/n^2`` re-applied at every
    level, the largest entry fixed at the level's cap, the cap rescaled by the mass left). When ``cap * n <= 1``
    (official: assertion error) the rows are uniform.
    """
    squeeze = p.dim() == 1
    q = p.float().reshape(1, -1) if squeeze else p.float()
    r, n = q.shape
    floor = 1 / n**2
    cur = q.clamp(min=floor)
    cur = cur / cur.sum(-1, keepdim=True)
    c = min(cap, 0.999)
    if n == 1:
        out = cur
    elif not c * n > 1.0:
        out = torch.full_like(cur, 1.0 / n)
    else:
        rows = torch.arange(r, device=q.device)
        mask = torch.ones_like(cur, dtype=torch.bool)
        active = torch.ones(r, dtype=torch.bool, device=q.device)  # rows that recurse past the current level
        terminal = torch.zeros_like(cur)
        levels: list[tuple[torch.Tensor, torch.Tensor, float, float]] = []
        for level in range(n):
            if level > 0:
                cur = torch.where(mask, cur.clamp(min=floor), torch.zeros_like(cur))
                cur = cur / cur.sum(-1, keepdim=True)
            c = min(c, 0.999)
            # Every active row has fixed one entry per level so far: n - level entries are still free.
            stop = (cur.amax(-1) <= c) if n - level > 1 else torch.ones_like(active)
            stop = stop & active
            terminal = torch.where(stop[:, None], cur, terminal)
            active = active & ~stop
            if not bool(active.any()):
                break
            j = cur.argmax(-1)
            rest = 1 - max(min(c, 0.999), 0.001)
            levels.append((active.clone(), j, c, rest))
            mask = mask & ~((torch.arange(n, device=q.device)[None, :] == j[:, None]) & active[:, None])
            c = c / rest
        out = terminal
        for act, j, c_level, rest in reversed(levels):
            scaled = out * rest
            scaled[rows, j] = c_level
            out = torch.where(act[:, None], scaled, out)
    out = out / out.sum(-1, keepdim=True)
    return out.reshape(-1) if squeeze else out


# ----------------------------------------------------------------------------------------------------------------------
# DPC-KNN


def _dpc_parts(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official float32 DPC-KNN score, log-density and delta for ``[B, M, D]`` features (one cdist per matrix)."""
    x = features.float()
    _, m, d = x.shape
    # One 2-D cdist per matrix, as the official calls it: a batched call may round differently.
    dist = torch.stack([torch.cdist(xi, xi) for xi in x]) / (d**0.5)
    nearest = dist.topk(min(k, m), dim=-1, largest=False).values  # the token itself is its own nearest neighbour
    log_density = -(nearest**2).mean(dim=-1)
    density = log_density.exp()
    dens_j, dens_i = density[:, None, :], density[:, :, None]
    denser = (dens_j > dens_i) | ((dens_j == dens_i) & (log_density[:, None, :] > log_density[:, :, None]))
    dist_max = dist.amax(dim=(-1, -2))[:, None, None]
    delta = torch.where(denser, dist, dist_max).amin(dim=-1)
    return delta * density, log_density, delta


def dpc_knn_scores(features: torch.Tensor, k: int = 4) -> torch.Tensor:
    """DPC-KNN density-peak score of every token, computed independently per leading index (frame).

    ``features`` is ``[T, N, D]``; returns ``[T, N]`` float32 scores ``density * delta`` exactly as the official
    ``div_sample`` computes them (jitter off): ``density = exp(-mean squared distance to the k nearest
    neighbours)``, the token itself included, distances divided by ``sqrt(D)``; ``delta`` = distance to the nearest
    strictly denser token (the largest distance in the frame for the densest ones).
    """
    return _dpc_parts(features, k)[0]


def dpc_knn_log_scores(features: torch.Tensor, k: int = 4) -> torch.Tensor:
    """``log(density * delta)`` computed without underflow (the tie-break key of ``dpc_rank``)."""
    _, log_density, delta = _dpc_parts(features, k)
    return log_density + delta.clamp_min(1e-30).log()


def dpc_rank(features: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Token order ``[B, M]`` by DPC-KNN score, best first: the official float32 score, then the log-score, then index.

    Chunked over ``B`` so that the distance matrices of a chunk hold at most ``_MAX_DIST_ELEMENTS`` entries.
    """
    b, m, _ = features.shape
    if b == 0:
        return torch.zeros(0, m, dtype=torch.long, device=features.device)
    chunk = max(1, _MAX_DIST_ELEMENTS // (m * m))
    out = []
    for start in range(0, b, chunk):
        score, log_density, delta = _dpc_parts(features[start : start + chunk], k)
        log_score = log_density + delta.clamp_min(1e-30).log()
        by_log = log_score.argsort(dim=-1, descending=True, stable=True)
        by_score = score.gather(-1, by_log).argsort(dim=-1, descending=True, stable=True)
        out.append(by_log.gather(-1, by_score))
    return torch.cat(out)


def content_sample(features: torch.Tensor, k_per_frame: int, knn_k: int = 4) -> torch.Tensor:
    """Per frame, the ``k_per_frame`` tokens with the highest DPC-KNN score: sorted flat indices ``[T * k]``."""
    t, n, _ = features.shape
    check_finite(features, "video features")
    if not 1 <= k_per_frame <= n:
        raise ValueError(f"k_per_frame={k_per_frame} must be in [1, {n}] (tokens per frame)")
    top = dpc_rank(features, knn_k)[:, :k_per_frame]
    flat = top + torch.arange(t, device=top.device)[:, None] * n
    return flat.reshape(-1).sort().values


def _stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row, ties broken by lower index (deterministic)."""
    return scores.argsort(dim=-1, descending=True, stable=True)[..., :k]


# ----------------------------------------------------------------------------------------------------------------------
# token mode


def band_sizes(n: int, num_group: int) -> list[int]:
    """Band lengths over the ranking: ``n // num_group`` each, the first ``n % num_group`` one longer (official)."""
    base, rem = divmod(n, num_group)
    return [base + 1 if i < rem else base for i in range(num_group)]


def band_probabilities(token_scores: torch.Tensor, num_group: int, max_group_prob: float) -> torch.Tensor:
    """Capped band-choice probabilities ``[T, num_group]`` (rows sum to 1) for ``[T, N]`` token scores."""
    p = token_scores.float().softmax(-1)
    p = p / p.sum(-1, keepdim=True)
    p_sorted = p.sort(dim=-1, descending=True).values
    mass = torch.stack([c.sum(-1) for c in p_sorted.split(band_sizes(p.shape[-1], num_group), dim=-1)], dim=-1)
    return cap_probs(mass, band_cap(num_group, max_group_prob))


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

    Per frame, as the official ``sample_without_replacement_h``: ``p = softmax(scores)`` renormalised; tokens sorted
    by ``p`` are split into ``num_bands`` contiguous bands; band probability = its summed ``p`` through
    ``clip_max_probability`` (``cap_probs``) and renormalised; one band per (sample, frame) is drawn with
    replacement, then ``k`` tokens without replacement from ``p`` restricted to the band, divided by
    ``sum + 1e-8``, clamped to ``[1/(2e), 2/e]`` (``e = N // num_bands``), and divided by ``sum + 1e-8`` again.
    """
    rate = check_rate(rate)
    check_finite(token_scores, "token scores")
    t, n = token_scores.shape
    if not 1 <= k_per_frame <= n:
        raise ValueError(f"k_per_frame={k_per_frame} must be in [1, {n}] (tokens per frame)")
    out_device = token_scores.device
    device = generator.device if generator is not None else out_device
    scores = token_scores.detach().float().to(device)
    if num_samples <= 0:
        return torch.zeros(0, t * k_per_frame, dtype=torch.long, device=out_device)
    p = scores.softmax(-1)
    p = p / p.sum(-1, keepdim=True)
    order = p.argsort(dim=-1, descending=True, stable=True)  # [T, N] token ids by rank
    offsets = torch.arange(t, device=device)[:, None] * n
    # The official top-k row ranks the plain softmax, the bands its renormalised copy (they differ only at ties).
    top = (_stable_topk(scores.softmax(-1), k_per_frame) + offsets).reshape(1, -1)
    if num_samples == 1:
        return top.sort(-1).values.to(out_device)

    s = num_samples - 1
    g = num_bands(rate, group_size, n, k_per_frame)
    band_p = band_probabilities(scores, g, max_group_prob)
    bands = torch.multinomial(band_p, s, replacement=True, generator=generator).T  # [S, T]

    sizes = torch.tensor(band_sizes(n, g), device=device)
    band_of_rank = torch.repeat_interleave(torch.arange(g, device=device), sizes)  # [N]
    in_band = (band_of_rank[None, None, :] == bands[:, :, None]).float()  # [S, T, N] over ranks
    e = n // g
    q = p.gather(-1, order)[None] * in_band
    q = q / (q.sum(-1, keepdim=True) + _BAND_EPS)
    q = q.clamp(max=2 / e, min=1 / e / 2) * in_band
    q = q / (q.sum(-1, keepdim=True) + _BAND_EPS)
    ranks = torch.multinomial(q.reshape(s * t, n), k_per_frame, replacement=False, generator=generator)
    tokens = order.expand(s, t, n).reshape(s * t, n).gather(-1, ranks).reshape(s, t, k_per_frame)
    sampled = (tokens + offsets[None]).reshape(s, -1)
    return torch.cat([top, sampled]).sort(-1).values.to(out_device)


# ----------------------------------------------------------------------------------------------------------------------
# frame mode


def frames_per_sample(t: int, frame_ratio: float) -> int:
    """Frames per frame-mode sample: the official ``max(ceil(t * frame_ratio), 1)``, at most ``t``."""
    if not 0.0 < frame_ratio <= 1.0:
        raise ValueError(f"frame_ratio {frame_ratio!r} must be in (0, 1]")
    return int(min(max(math.ceil(t * frame_ratio), 1), t))


def frame_draw_weights(frame_scores: torch.Tensor, num_samples: int, frame_cap: FrameCap = "official") -> torch.Tensor:
    """Row-normalised frame draw probabilities ``[num_samples, T]``; row ``i`` is used by sample ``i``.

    ``official``: ``clip_max_probability`` of the softmax repeated ``num_samples`` times, with cap ``3/T``, as the
    official ``sample_frame`` computes it (falling back to ``per_frame`` where that raises); ``per_frame``: each
    frame's probability capped at ``3/T`` (the 1-D official cap on the softmax).
    """
    if frame_cap not in ("official", "per_frame"):
        raise ValueError(f"frame_cap {frame_cap!r} must be 'official' or 'per_frame'")
    soft = frame_scores.detach().float().reshape(1, -1).softmax(dim=-1)
    t = soft.shape[-1]
    rows = max(num_samples, 1)
    if frame_cap == "official":
        try:
            w = clip_max_probability(soft.repeat(rows, 1), 3 / t)
            return w / w.sum(-1, keepdim=True)
        except ClipError:
            pass  # the official raises here; use the cap it intends (module docstring, deviations)
    return cap_probs(soft, 3 / t).expand(rows, t).contiguous()


def draw_frames(
    frame_scores: torch.Tensor,
    m: int,
    num_samples: int,
    frame_cap: FrameCap = "official",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[S, m]`` frame ids, ascending per row: row 0 the top-m frames, the others drawn without replacement."""
    device = generator.device if generator is not None else frame_scores.device
    scores = frame_scores.detach().float().reshape(-1).to(device)
    rows = [_stable_topk(scores.softmax(-1), m)[None]]  # the official ranks the softmax (float32 ties)
    if num_samples > 1:
        weights = frame_draw_weights(scores, num_samples, frame_cap)[1:]
        rows.append(torch.multinomial(weights, m, replacement=False, generator=generator))
    return torch.cat(rows).sort(-1).values


def _dpc_over_frames(features: torch.Tensor, chosen: torch.Tensor, budget: int, knn_k: int) -> torch.Tensor:
    """Top-``budget`` DPC-KNN tokens over the union of each row's frames (ascending frame ids), flat and sorted."""
    s, m = chosen.shape
    _, n, d = features.shape
    feats = features[chosen].reshape(s, m * n, d)  # frames ascending, tokens in order: the official union order
    pos = dpc_rank(feats, knn_k)[:, :budget]
    flat = chosen.gather(-1, pos // n) * n + pos % n
    return flat.sort(-1).values


def frame_samples_with_frames(
    frame_scores: torch.Tensor,
    features: torch.Tensor,
    total_budget: int,
    num_samples: int,
    frame_ratio: float = 0.125,
    knn_k: int = 4,
    generator: torch.Generator | None = None,
    frame_cap: FrameCap = "official",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame-mode combinations ``[num_samples, total_budget]`` (sorted flat indices) and drawn frames ``[S, T]``.

    Each sample draws ``ceil(t * frame_ratio)`` frames without replacement from ``frame_draw_weights`` (sample 0:
    the top-scored frames); more when the budget does not fit in them (a deviation: the official fails there). The
    budget is then spent on the drawn frames' tokens by one DPC-KNN over their union: tokens compete across the
    drawn frames and a drawn frame can get none (official), yet it is reported as drawn.
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
        empty = torch.zeros(0, total_budget, dtype=torch.long, device=out_device)
        return empty, torch.zeros(0, t, dtype=torch.bool, device=out_device)
    m = max(frames_per_sample(t, frame_ratio), math.ceil(total_budget / n))
    chosen = draw_frames(frame_scores, m, num_samples, frame_cap, generator).to(features.device)  # [S, m]
    keep = _dpc_over_frames(features, chosen, total_budget, knn_k)
    drawn = torch.zeros(num_samples, t, dtype=torch.bool, device=features.device).scatter(1, chosen, True)
    return keep.to(out_device), drawn.to(out_device)


def frame_samples(
    frame_scores: torch.Tensor,
    features: torch.Tensor,
    total_budget: int,
    num_samples: int,
    frame_ratio: float = 0.125,
    knn_k: int = 4,
    generator: torch.Generator | None = None,
    frame_cap: FrameCap = "official",
) -> torch.Tensor:
    """Frame-mode combinations ``[num_samples, total_budget]`` (see ``frame_samples_with_frames``)."""
    return frame_samples_with_frames(
        frame_scores, features, total_budget, num_samples, frame_ratio, knn_k, generator, frame_cap
    )[0]


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
    features ``[T, N, D]``. Every row keeps ``K = T * round(rate * N)`` tokens, sorted. ``frame_mask`` marks the
    drawn frames for frame-mode rows and the frames holding a kept token for the other rows.
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
    frm, drawn = frame_samples_with_frames(
        frame, features, t * k, cfg.num_frame, cfg.frame_ratio, cfg.knn_k, generator, cfg.frame_cap
    )
    keep = torch.cat([content, tok, frm.to(device)]).contiguous()
    with_token = torch.zeros(keep.shape[0] - cfg.num_frame, t, dtype=torch.bool, device=device)
    with_token.scatter_(1, keep[: with_token.shape[0]] // n, True)
    frame_mask = torch.cat([with_token, drawn.to(device)])
    mode = torch.cat(
        [
            torch.full((cfg.num_content,), MODE_CONTENT, dtype=torch.long),
            torch.full((cfg.num_token,), MODE_TOKEN, dtype=torch.long),
            torch.full((cfg.num_frame,), MODE_FRAME, dtype=torch.long),
        ]
    ).to(device)
    return Combinations(keep=keep, mode=mode, rate=rate, frame_mask=frame_mask)
