"""The CaCoVID policy loss (method.md, "Loss"): pure functions on scores, keep masks and rewards.

A combination is a Bernoulli keep/drop decision for every video token (token head) and every frame (frame
head). Per decision: ``ratio = exp(logp - logp_old)`` and the PPO-style clipped surrogate
``-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)``.

- Token-mode samples form the token loss: class-balance weights ``w = m(1 - mean m) + (1 - m) mean m`` make
  kept and dropped tokens weigh the same in each sample; weighted mean over tokens, mean over samples.
- Frame-mode samples form the frame loss on the frame head through their frame mask: the frames that were
  *drawn*, as in the official loss (``types.Combinations.frame_mask``), even where DPC-KNN then gave a drawn
  frame no token; without masks, the frames holding a kept token. Plain mean over samples and frames. Its
  advantages are normalised separately from the token ones.
- Content samples (DPC-KNN, policy-free) are excluded: they were not drawn from the policy, so they have no
  likelihood ratio to optimise; they only inform (their reward is logged as ``reward/content_mean``).
- Optional k3 KL towards Bernoulli(0.5) on the taken decisions, ``exp(r) - r - 1`` with
  ``r = log 0.5 - logp`` (token KL class-balance weighted like the token loss), scaled by ``cfg.kl_coef``.

The scores are the logit differences ``logit[1] - logit[0]`` of the official two-column heads; the Bernoulli
log-probability ``logsigmoid(+-s)`` is the official ``log_softmax`` of the two logits, so the loss and its
gradient match the official code (tests/golden/loss.json, through the logits).

Gradients flow only through ``new``; ``old`` scores, masks and rewards are constants.

Stale rollouts (decoupled PPO, Hilton et al. 2021): when the combinations were drawn by an older policy than
the one being updated (``learner.max_staleness > 0``), the learner passes ``prox``, its own scores at the start
of the update. The trust region is then measured against ``prox`` (``ratio = pi / pi_prox``) and each decision is
weighted by the truncated importance weight ``min(pi_prox / pi_old, cfg.max_is_weight)`` (a constant). Measured
against the behaviour policy instead, every first-iteration ratio of a two-versions-old rollout sits far outside
the clip range at lr 3e-3 (clip fraction 0.25 by update 10) and the scores drift until the policy keeps
everything. With ``prox`` equal to ``old`` (on-policy) both forms are the same loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cacovid_rl.config import LossConfig
from cacovid_rl.types import MODE_CONTENT, MODE_FRAME, MODE_TOKEN, PolicyScores

_LOG_HALF = math.log(0.5)
MAX_LOG_RATIO = 20.0


def bernoulli_logprob(scores: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """Elementwise Bernoulli log-probability of the keep/drop state: ``logsigmoid(s)`` if kept else ``logsigmoid(-s)``.

    ``scores`` broadcasts against ``keep_mask`` (e.g. ``[T*N]`` scores with ``[S, T*N]`` masks).
    """
    return torch.where(keep_mask.bool(), F.logsigmoid(scores), F.logsigmoid(-scores))


def bernoulli_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Elementwise entropy (nats) of the keep/drop decision with log-odds ``scores``: ``softplus(s) - s sigmoid(s)``.

    The same as ``-p log p - (1 - p) log(1 - p)`` with ``p = sigmoid(s)`` but finite at any score: ``log 2`` for a coin
    flip (``s = 0``), towards 0 as the head grows certain. A head collapsing to certainty (keep or drop everything)
    shows here before the reward moves.
    """
    return (F.softplus(scores) - scores * torch.sigmoid(scores)).clamp(min=0.0)


def _rows(keep: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(keep, torch.Tensor):
        if keep.dim() != 2:
            raise ValueError(f"keep tensor must be [S, K], got shape {tuple(keep.shape)}")
        return list(keep)
    return [torch.as_tensor(r).reshape(-1) for r in keep]


def keep_masks(keep: list[torch.Tensor] | torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Boolean keep masks ``[S, num_tokens]`` from kept flat indices; rows may have different lengths."""
    rows = _rows(keep)
    if not rows:
        return torch.zeros(0, num_tokens, dtype=torch.bool)
    device = rows[0].device
    flat = torch.cat([r.to(device=device, dtype=torch.long) for r in rows])
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_tokens):
        raise ValueError(
            f"kept indices span [{int(flat.min())}, {int(flat.max())}] but must lie in [0, {num_tokens}); "
            "were the combinations sampled for a different video shape?"
        )
    lengths = torch.tensor([r.numel() for r in rows], device=device)
    row_ids = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths)
    mask = torch.zeros(len(rows), num_tokens, dtype=torch.bool, device=device)
    mask[row_ids, flat] = True
    return mask


def frame_keep_masks(keep: list[torch.Tensor] | torch.Tensor, t: int, n: int) -> torch.Tensor:
    """Frame keep masks ``[S, T]``: a frame is kept when any of its ``n`` tokens is kept."""
    return keep_masks(keep, t * n).reshape(-1, t, n).any(-1)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` with the **sample** (unbiased, ``n - 1``) std, as the reference's ``torch.std``.

    A single sample (no group to compare against) gets advantage 0; so does a group with equal rewards.
    """
    r = rewards.detach().float().reshape(-1)
    if r.numel() <= 1:
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std(unbiased=True) + eps)


def _clipped_surrogate(
    logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-decision clipped loss, the "clip active" mask and the ratio.

    The log-ratio is clamped to ``[-MAX_LOG_RATIO, MAX_LOG_RATIO]`` before ``exp``: a decision whose score
    moved far within one update (large learning rates on the tiny model do this) would otherwise give
    ``ratio = inf`` and, for a negative advantage, an infinite loss that kills the run. Inside the clamp
    nothing changes; beyond it the (already clipped-away or huge) term stops growing and has no gradient.
    """
    ratio = torch.exp((logp - logp_old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    active = ((ratio < 1.0 - cfg.clip_low) & (adv < 0)) | ((ratio > 1.0 + cfg.clip_high) & (adv > 0))
    return loss, active, ratio


def _k3_to_half(logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || Bernoulli(0.5)) per taken decision: ``exp(r) - r - 1``, ``r = log 0.5 - logp``."""
    r = (_LOG_HALF - logp).clamp(max=MAX_LOG_RATIO)  # a near-certain decision taken the unlikely way: exp overflows
    return torch.exp(r) - r - 1.0


def class_balance_weights(mask: torch.Tensor) -> torch.Tensor:
    """``w = m (1 - mean m) + (1 - m) mean m`` per row: kept and dropped tokens carry equal total weight."""
    m = mask.float()
    mean = m.mean(-1, keepdim=True)
    return m * (1.0 - mean) + (1.0 - m) * mean


@dataclass
class LossOutput:
    """Loss terms (scalar tensors; ``total`` is what to backpropagate) and namespaced float metrics."""

    total: torch.Tensor
    token: torch.Tensor
    frame: torch.Tensor
    kl: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _select(rows: list[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    return [rows[i] for i in idx.tolist()]


def _is_weights(logp_prox: torch.Tensor, logp_old: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated behaviour -> proximal importance weights ``min(exp(logp_prox - logp_old), cap)`` (constants)."""
    return torch.exp((logp_prox - logp_old).clamp(max=math.log(cap))).detach()


def cacovid_loss(
    new: PolicyScores,
    old: PolicyScores,
    keep: list[torch.Tensor] | torch.Tensor,
    modes: torch.Tensor,
    rewards: torch.Tensor,
    cfg: LossConfig,
    prox: PolicyScores | None = None,
    frame_masks: torch.Tensor | None = None,
) -> LossOutput:
    """CaCoVID loss over one question's memory: ``keep[i]`` (flat kept indices), ``modes[i]``, ``rewards[i]``.

    ``frame_masks`` ``[S, T]`` (bool): which frames each sample counts as kept in the frame loss (module
    docstring); ``None`` derives them from ``keep``.

    ``new`` are the current policy's scores (with gradients), ``old`` the first-iteration scores the
    combinations were sampled from. A mode without samples contributes a zero that is still connected to
    the graph, so ``total.backward()`` always works. ``frame`` is always computed (for logging); ``total``
    includes it (and its KL) only when ``cfg.frame_loss``. ``kl`` is the unweighted KL; ``total`` adds
    ``cfg.kl_coef * kl``. ``prox``: the updating policy's own scores before this update, for stale rollouts
    (module docstring); ``None`` means on-policy (``prox = old``).
    """
    rows = _rows(keep)
    modes = torch.as_tensor(modes).reshape(-1).cpu()
    rewards = torch.as_tensor(rewards).detach().float().reshape(-1).cpu()
    if not len(rows) == modes.numel() == rewards.numel():
        raise ValueError(
            f"memory sizes differ: {len(rows)} combinations, {modes.numel()} modes, {rewards.numel()} rewards"
        )
    t, n = new.token.shape
    if frame_masks is not None and tuple(frame_masks.shape) != (len(rows), t):
        raise ValueError(f"frame_masks must be [{len(rows)}, {t}] (samples x frames), got {tuple(frame_masks.shape)}")
    token_new = new.token.float().reshape(-1)
    frame_new = new.frame.float().reshape(-1)
    zero = token_new.sum() * 0.0 + frame_new.sum() * 0.0
    tok_idx = (modes == MODE_TOKEN).nonzero().squeeze(1)
    frm_idx = (modes == MODE_FRAME).nonzero().squeeze(1)
    metrics: dict[str, float] = {}

    token_loss, token_kl = zero, zero
    if tok_idx.numel():
        mask = keep_masks(_select(rows, tok_idx), t * n).to(token_new.device)
        logp = bernoulli_logprob(token_new[None], mask)
        logp_old = bernoulli_logprob(old.token.detach().float().reshape(-1)[None], mask)
        adv = group_advantages(rewards[tok_idx], cfg.adv_eps).to(token_new.device)[:, None]
        if prox is not None:
            logp_prox = bernoulli_logprob(prox.token.detach().float().reshape(-1)[None], mask)
            is_w = _is_weights(logp_prox, logp_old, cfg.max_is_weight)
            per_tok, active, ratio = _clipped_surrogate(logp, logp_prox, adv, cfg)
            per_tok = per_tok * is_w
            metrics["policy/is_weight_mean"] = float(is_w.mean())
            logp_old = logp_prox  # the trust-region metrics below are against the proximal policy
        else:
            per_tok, active, ratio = _clipped_surrogate(logp, logp_old, adv, cfg)
        w = class_balance_weights(mask)
        w_sum = w.sum(-1) + 1e-7  # the official guard: an all-kept or all-dropped row has weight 0 and loss 0
        token_loss = ((per_tok * w).sum(-1) / w_sum).mean()
        token_kl = ((_k3_to_half(logp) * w).sum(-1) / w_sum).mean()
        with torch.no_grad():
            log_ratio = logp - logp_old
            metrics["policy/clip_frac"] = float(active.float().mean())
            metrics["policy/approx_kl"] = float(((ratio - 1.0) - log_ratio).mean())
            metrics["policy/ratio_max"] = float(ratio.max())

    frame_loss, frame_kl = zero, zero
    if frm_idx.numel():
        if frame_masks is not None:
            fmask = frame_masks[frm_idx.to(frame_masks.device)].bool().to(frame_new.device)
        else:
            fmask = frame_keep_masks(_select(rows, frm_idx), t, n).to(frame_new.device)
        logp = bernoulli_logprob(frame_new[None], fmask)
        logp_old = bernoulli_logprob(old.frame.detach().float().reshape(-1)[None], fmask)
        adv = group_advantages(rewards[frm_idx], cfg.adv_eps).to(frame_new.device)[:, None]
        if prox is not None:
            logp_prox = bernoulli_logprob(prox.frame.detach().float().reshape(-1)[None], fmask)
            per_frame, active, _ = _clipped_surrogate(logp, logp_prox, adv, cfg)
            per_frame = per_frame * _is_weights(logp_prox, logp_old, cfg.max_is_weight)
        else:
            per_frame, active, _ = _clipped_surrogate(logp, logp_old, adv, cfg)
        frame_loss = per_frame.mean()
        frame_kl = _k3_to_half(logp).mean()
        metrics["policy/frame_clip_frac"] = float(active.float().mean())

    use_frame = 1.0 if cfg.frame_loss else 0.0
    kl = token_kl + use_frame * frame_kl
    total = token_loss + use_frame * frame_loss
    if cfg.kl_coef > 0:  # never 0 * (a huge KL): the KL is logged either way
        total = total + cfg.kl_coef * kl
    metrics["loss/token_kl"] = float(token_kl.detach())
    metrics["loss/frame_kl"] = float(frame_kl.detach())
    metrics.update(_summary(total, token_loss, frame_loss, kl, token_new, frame_new, rewards, modes))
    return LossOutput(total=total, token=token_loss, frame=frame_loss, kl=kl, metrics=metrics)


def _summary(
    total: torch.Tensor,
    token_loss: torch.Tensor,
    frame_loss: torch.Tensor,
    kl: torch.Tensor,
    token_new: torch.Tensor,
    frame_new: torch.Tensor,
    rewards: torch.Tensor,
    modes: torch.Tensor,
) -> dict[str, float]:
    """Loss values, keep probabilities, head entropies and per-mode reward statistics (0.0 for a mode without samples).

    ``policy/token_entropy`` and ``policy/frame_entropy`` are the mean Bernoulli entropy (nats) per decision of the
    updating policy's token and frame heads over every token and frame of the question (not only the sampled ones);
    ``log 2 = 0.693`` is a uniform coin, 0 a deterministic head. Metrics only: the loss has no entropy term.

    ``adv/<mode>_std`` is the sample std of the rewards the advantages are divided by: 0 means the group
    carries no learning signal (all combinations scored the same).
    """

    def stats(mode: int) -> tuple[float, float, int]:
        r = rewards[modes == mode]
        mean = float(r.mean()) if r.numel() else 0.0
        std = float(r.std(unbiased=True)) if r.numel() > 1 else 0.0
        return mean, std, int(r.numel())

    tok_mean, tok_std, tok_n = stats(MODE_TOKEN)
    frm_mean, frm_std, frm_n = stats(MODE_FRAME)
    con_mean, _, con_n = stats(MODE_CONTENT)
    with torch.no_grad():
        return {
            "loss/total": float(total),
            "loss/token": float(token_loss),
            "loss/frame": float(frame_loss),
            "loss/kl": float(kl),
            "policy/keep_prob_mean": float(torch.sigmoid(token_new).mean()),
            "policy/frame_keep_prob_mean": float(torch.sigmoid(frame_new).mean()),
            "policy/token_entropy": float(bernoulli_entropy(token_new).mean()),
            "policy/frame_entropy": float(bernoulli_entropy(frame_new).mean()),
            "reward/token_mean": tok_mean,
            "reward/frame_mean": frm_mean,
            "reward/content_mean": con_mean,
            "adv/token_std": tok_std,
            "adv/frame_std": frm_std,
            "samples/token": float(tok_n),
            "samples/frame": float(frm_n),
            "samples/content": float(con_n),
        }
