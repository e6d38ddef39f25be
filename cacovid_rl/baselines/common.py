"""Building blocks shared by the merging baselines: exact budget splits, DPC-kNN clustering, temporal segments,
group averaging and the LLM-attention lookup. Deterministic: ties break by index (the published codes add 1e-6
random noise to densities instead), so a method gives the same block for the same question every time."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from cacovid_rl.baselines.base import SelectionContext


def allocate(total: int, weights: torch.Tensor, caps: torch.Tensor, minimum: int = 0) -> torch.LongTensor:
    """Split ``total`` over groups in proportion to ``weights``, each at most ``caps[g]``, summing exactly to ``total``.

    Each group first gets ``min(minimum, cap)`` when ``total`` covers those minimums (so a frame keeps at least
    one token when the budget allows it, as VidCom2 and FrameFusion's per-frame rules do); the rest is handed out
    by largest remainder (water-filling over the groups that still have room). Raises ``ValueError`` when
    ``total`` exceeds the summed caps.
    """
    caps = caps.long().cpu()
    w = weights.double().cpu().clamp_min(0)
    if total > int(caps.sum()):
        raise ValueError(f"cannot place {total} tokens in groups holding {int(caps.sum())}")
    floor = caps.clamp(max=minimum)
    out = floor.clone() if int(floor.sum()) <= total else torch.zeros_like(caps)
    rest = total - int(out.sum())
    while rest > 0:
        room = caps - out
        active = room > 0
        ww = torch.where(active, w, torch.zeros_like(w))
        if float(ww.sum()) <= 0:
            ww = active.double()
        quota = rest * ww / ww.sum()
        add = torch.minimum(quota.floor().long(), room)
        if int(add.sum()) == 0:
            # Every quota is below one token: the largest fractions get one each.
            for g in quota.argsort(descending=True, stable=True).tolist():
                if rest == 0:
                    break
                if room[g] > 0:
                    out[g] += 1
                    rest -= 1
            continue
        out += add
        rest -= int(add.sum())
    return out


def dpc_knn(x: torch.Tensor, num_clusters: int, k: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """DPC-kNN clustering of ``x [M, D]`` into ``num_clusters`` clusters (Du et al. 2016, as PruneVid/FlashVID use it).

    Distances are Euclidean over ``sqrt(D)``; density ``exp(-mean squared distance to the k nearest points)`` (the
    point itself included, as the published code does); ``delta`` the distance to the nearest denser point (the
    largest distance for the densest); centres are the ``num_clusters`` largest ``density * delta``; every point
    joins its nearest centre and each centre itself. Returns ``(assign [M], centres [C])``.
    """
    m, d = x.shape
    if not 1 <= num_clusters <= m:
        raise ValueError(f"cannot form {num_clusters} clusters from {m} points")
    x = x.float()
    dist = torch.cdist(x, x) / math.sqrt(max(d, 1))
    nearest = dist.topk(min(k, m), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))
    idx = torch.arange(m, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )
    delta = torch.where(denser, dist, dist.max()).amin(-1)
    centres = (delta * density).argsort(descending=True, stable=True)[:num_clusters]
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(num_clusters, device=x.device)
    return assign, centres


def dpc_scores(x: torch.Tensor, k: int) -> torch.Tensor:
    """DPC-kNN centre score ``density * delta`` of every row of ``x [M, D]`` (FastVID's anchor-token ranking)."""
    m, d = x.shape
    x = x.float()
    dist = torch.cdist(x, x) / math.sqrt(max(d, 1))
    nearest = dist.topk(min(k, m), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))
    idx = torch.arange(m, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )
    return torch.where(denser, dist, dist.max()).amin(-1) * density


def transition_similarity(frame_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[T-1]`` of adjacent frames' global features ``[T, D]`` (frame ``t`` vs ``t + 1``)."""
    g = F.normalize(frame_features.float(), dim=-1)
    return (g[:-1] * g[1:]).sum(-1)


def lengths_from_cuts(cuts: torch.Tensor, t: int) -> list[int]:
    """Segment lengths when the video is cut after each frame index in ``cuts`` (values in ``[0, T-1)``)."""
    bounds = [-1, *sorted(set(int(c) for c in cuts.tolist())), t - 1]
    return [b - a for a, b in itertools.pairwise(bounds) if b > a]


def average_groups(x: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean ``[G, D]`` of the rows of ``x [M, D]`` per ``group [M]`` id (every group must have a member)."""
    sums = torch.zeros(num_groups, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, group, x.float())
    counts = torch.zeros(num_groups, dtype=torch.float32, device=x.device).index_add_(
        0, group, torch.ones_like(group, dtype=torch.float32)
    )
    return sums / counts.clamp_min(1)[:, None]


def _last_layer(adapter: object) -> int | None:
    layers = getattr(getattr(adapter, "language_model", None), "layers", None)
    try:
        return len(layers) - 1 if layers is not None else None
    except TypeError:
        return None


def llm_attention(ctx: SelectionContext, layer: int, who: str) -> torch.Tensor:
    """Attention ``[T*N]`` the last input token pays each video token at LLM layer ``layer`` (head mean).

    The layer is clamped to the model's last one (the published layers 10 / 20 exceed a small LLM's depth).
    Raises ``ValueError`` when the context has no adapter that can compute it, or it is malformed.
    """
    fn = getattr(ctx.adapter, "early_layer_attention", None)
    if fn is None:
        raise ValueError(f"{who} needs ctx.adapter with early_layer_attention(enc, layer); got no such adapter")
    last = _last_layer(ctx.adapter)
    if last is not None:
        layer = max(0, min(layer, last))
    total = ctx.enc.num_video_tokens
    attn = torch.as_tensor(fn(ctx.enc, layer=layer)).detach().float().reshape(-1)
    if attn.numel() != total:
        raise ValueError(f"early_layer_attention returned {attn.numel()} values for {total} video tokens")
    if not torch.isfinite(attn).all():
        raise ValueError("early_layer_attention returned NaN/inf; run the adapter in float32 or check the model")
    return attn
