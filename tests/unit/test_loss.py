"""CaCoVID loss: hand-computed values, gradient signs, clipping, mode separation and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from cacovid_rl.config import LossConfig
from cacovid_rl.rl.loss import (
    bernoulli_logprob,
    cacovid_loss,
    class_balance_weights,
    frame_keep_masks,
    group_advantages,
    keep_masks,
)
from cacovid_rl.types import MODE_CONTENT, MODE_FRAME, MODE_TOKEN, PolicyScores

CFG = LossConfig()


def scores(token: list[list[float]], frame: list[float], grad: bool = False) -> PolicyScores:
    return PolicyScores(torch.tensor(token, requires_grad=grad), torch.tensor(frame, requires_grad=grad))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bernoulli_logprob() -> None:
    s = torch.tensor([0.0, 2.0, 2.0, -1.0])
    m = torch.tensor([True, True, False, False])
    expected = [math.log(0.5), log_sigmoid(2.0), log_sigmoid(-2.0), log_sigmoid(1.0)]
    torch.testing.assert_close(bernoulli_logprob(s, m), torch.tensor(expected))
    # broadcasting [N] scores against [S, N] masks
    assert bernoulli_logprob(s, torch.ones(3, 4, dtype=torch.bool)).shape == (3, 4)


def test_keep_masks_ragged_rows_and_frames() -> None:
    keep = [torch.tensor([0, 5]), torch.tensor([1, 2, 3, 7])]
    m = keep_masks(keep, 8)
    assert m.tolist() == [
        [True, False, False, False, False, True, False, False],
        [False, True, True, True, False, False, False, True],
    ]
    assert frame_keep_masks(keep, 2, 4).tolist() == [[True, True], [True, True]]
    assert frame_keep_masks([torch.tensor([5, 6])], 2, 4).tolist() == [[False, True]]
    assert keep_masks(torch.tensor([[0, 1], [2, 3]]), 4).sum().item() == 4
    assert keep_masks([], 4).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        keep_masks([torch.tensor([8])], 8)


def test_group_advantages_sample_std() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    std = math.sqrt(4 * 0.25 / 3)  # sample std
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert group_advantages(torch.tensor([0.7])).tolist() == [0.0]
    assert group_advantages(torch.tensor([1.0, 1.0, 1.0])).abs().max() == 0


def test_class_balance_weights() -> None:
    w = class_balance_weights(torch.tensor([[True, False, False, False]]))
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25, 0.25, 0.25]]))  # kept 0.75 == dropped 3 * 0.25


def reference_token_loss(new: list[float], old: list[float], masks: list[list[int]], rewards: list[float]) -> float:
    """The token loss written out with plain floats, one decision at a time."""
    mean_r = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean_r) ** 2 for r in rewards) / (len(rewards) - 1))
    total = 0.0
    for mask, r in zip(masks, rewards, strict=True):
        a = (r - mean_r) / (std + 1e-4)
        frac = sum(mask) / len(mask)
        num = den = 0.0
        for s, s_old, m in zip(new, old, mask, strict=True):
            logp = log_sigmoid(s) if m else log_sigmoid(-s)
            logp_old = log_sigmoid(s_old) if m else log_sigmoid(-s_old)
            ratio = math.exp(logp - logp_old)
            clipped = min(max(ratio, 0.8), 1.28)
            loss = -min(ratio * a, clipped * a)
            w = (1 - frac) if m else frac
            num += w * loss
            den += w
        total += num / den
    return total / len(masks)


def test_token_loss_matches_hand_computation() -> None:
    new = [1.0, -0.3, 0.2, 0.0]  # token 0: ratio 1.46 when kept -> clipped for a positive advantage
    old = [0.0, 0.1, 0.0, -0.5]
    keep = [torch.tensor([0]), torch.tensor([1, 2]), torch.tensor([0, 3])]
    masks = [[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]]
    rewards = [1.0, 0.0, 0.5]
    out = cacovid_loss(
        scores([new], [0.0]),
        scores([old], [0.0]),
        keep,
        torch.tensor([MODE_TOKEN] * 3),
        torch.tensor(rewards),
        CFG,
    )
    expected = reference_token_loss(new, old, masks, rewards)
    assert out.token.item() == pytest.approx(expected, rel=1e-5)
    assert out.frame.item() == 0.0
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["loss/token"] == pytest.approx(expected, rel=1e-5)
    assert out.metrics["policy/clip_frac"] > 0


def test_frame_loss_matches_hand_computation() -> None:
    # T=2 frames of N=2 tokens. Frame sample 0 keeps frame 0 only, sample 1 keeps both frames.
    new_f, old_f = [0.4, -0.2], [0.0, 0.0]
    keep = [torch.tensor([0]), torch.tensor([1, 3])]
    rewards = [0.0, 1.0]
    out = cacovid_loss(
        scores([[0.0, 0.0], [0.0, 0.0]], new_f),
        scores([[0.0, 0.0], [0.0, 0.0]], old_f),
        keep,
        torch.tensor([MODE_FRAME, MODE_FRAME]),
        torch.tensor(rewards),
        CFG,
    )
    std = math.sqrt(0.5)
    adv = [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)]
    frame_masks = [[1, 0], [1, 1]]
    losses = []
    for mask, a in zip(frame_masks, adv, strict=True):
        for s, s_old, m in zip(new_f, old_f, mask, strict=True):
            ratio = math.exp(
                (log_sigmoid(s) if m else log_sigmoid(-s)) - (log_sigmoid(s_old) if m else log_sigmoid(-s_old))
            )
            losses.append(-min(ratio * a, min(max(ratio, 0.8), 1.28) * a))
    assert out.frame.item() == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert out.token.item() == 0.0
    no_frame = cacovid_loss(
        scores([[0.0, 0.0], [0.0, 0.0]], new_f),
        scores([[0.0, 0.0], [0.0, 0.0]], old_f),
        keep,
        torch.tensor([MODE_FRAME, MODE_FRAME]),
        torch.tensor(rewards),
        LossConfig(frame_loss=False),
    )
    assert no_frame.total.item() == 0.0 and no_frame.frame.item() == pytest.approx(out.frame.item())


def sgd_step(new: PolicyScores, loss: torch.Tensor, lr: float = 0.5) -> PolicyScores:
    loss.backward()
    with torch.no_grad():
        return PolicyScores(new.token - lr * new.token.grad, new.frame - lr * new.frame.grad)


def seq_logp(s: PolicyScores, keep: torch.Tensor) -> float:
    mask = keep_masks([keep], s.token.numel())[0]
    return float(bernoulli_logprob(s.token.reshape(-1), mask).sum())


def test_positive_advantage_raises_its_log_prob() -> None:
    torch.manual_seed(0)
    t, n = 2, 6
    old = PolicyScores(torch.randn(t, n), torch.randn(t))
    new = PolicyScores(old.token.clone().requires_grad_(True), old.frame.clone().requires_grad_(True))
    good, bad = torch.tensor([0, 1, 6, 7]), torch.tensor([3, 4, 9, 10])
    out = cacovid_loss(new, old, [good, bad], torch.tensor([MODE_TOKEN, MODE_TOKEN]), torch.tensor([1.0, 0.0]), CFG)
    stepped = sgd_step(new, out.total)
    assert seq_logp(stepped, good) > seq_logp(old, good)
    assert seq_logp(stepped, bad) < seq_logp(old, bad)


def test_positive_advantage_frame_sample_raises_frame_keep_prob() -> None:
    t, n = 3, 2
    old = PolicyScores(torch.zeros(t, n), torch.zeros(t))
    new = PolicyScores(old.token.clone().requires_grad_(True), old.frame.clone().requires_grad_(True))
    keep = [torch.tensor([0, 1]), torch.tensor([4, 5])]  # frame 0 (good) vs frame 2 (bad)
    out = cacovid_loss(new, old, keep, torch.tensor([MODE_FRAME, MODE_FRAME]), torch.tensor([1.0, 0.0]), CFG)
    stepped = sgd_step(new, out.total)
    assert stepped.frame[0] > 0 > stepped.frame[2]
    assert torch.equal(stepped.token, old.token), "frame samples must not move the token head"


def test_clipping_zeroes_gradient_only_beyond_the_trust_region() -> None:
    # One kept token whose ratio is far above 1 + clip_high: clipped (no gradient) for A > 0, not for A < 0.
    old = PolicyScores(torch.zeros(1, 4), torch.zeros(1))
    keep = [torch.tensor([0]), torch.tensor([1])]
    for rewards, clipped in ((torch.tensor([1.0, 0.0]), True), (torch.tensor([0.0, 1.0]), False)):
        new = PolicyScores(torch.tensor([[3.0, 0.0, 0.0, 0.0]], requires_grad=True), torch.zeros(1, requires_grad=True))
        out = cacovid_loss(new, old, keep, torch.tensor([MODE_TOKEN, MODE_TOKEN]), rewards, CFG)
        out.total.backward()
        grad0 = new.token.grad[0, 0].item()
        assert (grad0 == 0.0) == clipped, f"rewards {rewards.tolist()}: grad {grad0}"


def test_a_far_moved_score_gives_a_finite_loss() -> None:
    # A kept token whose score rose by 200 within the update (exp(200) overflows float32) in a sample with a
    # negative advantage: the loss stays finite (log-ratio clamped) instead of aborting the run.
    old = PolicyScores(torch.full((1, 4), -100.0), torch.zeros(1))
    keep = [torch.tensor([0]), torch.tensor([1])]
    new = PolicyScores(torch.tensor([[100.0, -100.0, -100.0, -100.0]], requires_grad=True), torch.zeros(1))
    out = cacovid_loss(new, old, keep, torch.tensor([MODE_TOKEN, MODE_TOKEN]), torch.tensor([0.0, 1.0]), CFG)
    out.total.backward()
    assert math.isfinite(float(out.total.detach())) and out.total.detach() > 1e6
    assert torch.isfinite(new.token.grad).all()


def test_content_samples_do_not_affect_the_loss() -> None:
    torch.manual_seed(1)
    old = PolicyScores(torch.randn(2, 4), torch.randn(2))
    new = PolicyScores(old.token + 0.1, old.frame - 0.1)
    keep = [torch.tensor([0, 5]), torch.tensor([1, 6]), torch.tensor([2, 3]), torch.tensor([0, 1])]
    modes = torch.tensor([MODE_CONTENT, MODE_TOKEN, MODE_TOKEN, MODE_FRAME])
    a = cacovid_loss(new, old, keep, modes, torch.tensor([1.0, 1.0, 0.0, 0.5]), CFG)
    b = cacovid_loss(new, old, keep, modes, torch.tensor([0.0, 1.0, 0.0, 0.5]), CFG)
    keep_c = [torch.tensor([3, 7]), *keep[1:]]
    c = cacovid_loss(new, old, keep_c, modes, torch.tensor([1.0, 1.0, 0.0, 0.5]), CFG)
    assert a.total.item() == b.total.item() == c.total.item()
    assert a.metrics["reward/content_mean"] == 1.0 and b.metrics["reward/content_mean"] == 0.0


def test_missing_modes_give_connected_zero() -> None:
    new = PolicyScores(torch.zeros(2, 3, requires_grad=True), torch.zeros(2, requires_grad=True))
    old = PolicyScores(torch.zeros(2, 3), torch.zeros(2))
    out = cacovid_loss(new, old, [torch.tensor([0, 4])], torch.tensor([MODE_CONTENT]), torch.tensor([1.0]), CFG)
    assert out.total.item() == 0.0
    out.total.backward()
    assert new.token.grad is not None and new.token.grad.abs().sum() == 0


def test_kl_towards_half() -> None:
    # At scores 0 the policy is Bernoulli(0.5): k3 KL is exactly 0. Away from 0 it is positive and adds to total.
    keep = [torch.tensor([0]), torch.tensor([1, 2])]
    modes, rewards = torch.tensor([MODE_TOKEN, MODE_TOKEN]), torch.tensor([1.0, 0.0])
    at_half = cacovid_loss(scores([[0.0] * 4], [0.0]), scores([[0.0] * 4], [0.0]), keep, modes, rewards, CFG)
    assert at_half.kl.item() == pytest.approx(0.0, abs=1e-7)
    new, old = scores([[2.0, -1.0, 0.5, 0.0]], [0.0]), scores([[0.0] * 4], [0.0])
    plain = cacovid_loss(new, old, keep, modes, rewards, CFG)
    with_kl = cacovid_loss(new, old, keep, modes, rewards, LossConfig(kl_coef=0.5))
    assert plain.kl.item() > 0
    assert with_kl.total.item() == pytest.approx(plain.total.item() + 0.5 * plain.kl.item(), rel=1e-6)

    # By hand: per sample, the class-balanced mean of k3 = exp(r) - r - 1, r = log 0.5 - log p(decision taken),
    # over the 4 tokens (scores 2, -1, 0.5, 0); then the mean over the two samples.
    def k3(logp: float) -> float:
        r = math.log(0.5) - logp
        return math.exp(r) - r - 1

    s = [2.0, -1.0, 0.5, 0.0]
    expected = 0.0
    for kept in ({0}, {1, 2}):
        frac = len(kept) / 4
        w = [(1 - frac) if j in kept else frac for j in range(4)]
        lp = [log_sigmoid(s[j]) if j in kept else log_sigmoid(-s[j]) for j in range(4)]
        expected += sum(wj * k3(lj) for wj, lj in zip(w, lp, strict=True)) / sum(w) / 2
    assert plain.kl.item() == pytest.approx(expected, rel=1e-5)


def test_metrics_keys_and_ragged_memory() -> None:
    # Memory across iterations at different rates: token rows with 2 and 4 kept tokens.
    old = PolicyScores(torch.zeros(2, 4), torch.zeros(2))
    new = PolicyScores(torch.full((2, 4), 0.1, requires_grad=True), torch.zeros(2, requires_grad=True))
    keep = [torch.tensor([0, 4]), torch.tensor([1, 5]), torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])]
    modes = torch.tensor([MODE_TOKEN, MODE_TOKEN, MODE_TOKEN, MODE_FRAME])
    out = cacovid_loss(new, old, keep, modes, torch.tensor([1.0, 0.0, 1.0, 0.0]), CFG)
    out.total.backward()
    for key in (
        "loss/token",
        "loss/frame",
        "loss/kl",
        "policy/clip_frac",
        "policy/approx_kl",
        "policy/keep_prob_mean",
        "reward/token_mean",
        "reward/frame_mean",
        "adv/token_std",
    ):
        assert isinstance(out.metrics[key], float), key
    assert out.metrics["reward/token_mean"] == pytest.approx(2 / 3)
    assert out.metrics["policy/keep_prob_mean"] == pytest.approx(1 / (1 + math.exp(-0.1)))


def test_size_mismatch_raises() -> None:
    s = scores([[0.0, 0.0]], [0.0])
    with pytest.raises(ValueError, match="memory sizes differ"):
        cacovid_loss(s, s, [torch.tensor([0])], torch.tensor([MODE_TOKEN, MODE_TOKEN]), torch.tensor([1.0]), CFG)


def test_proximal_loss_equals_on_policy_loss_when_nothing_is_stale() -> None:
    old = scores([[0.3, -0.2, 1.0, -1.0]], [0.1])
    keep = [torch.tensor([0]), torch.tensor([2]), torch.tensor([1, 3])]
    modes, rewards = torch.tensor([MODE_TOKEN, MODE_TOKEN, MODE_FRAME]), torch.tensor([1.0, 0.0, 1.0])
    grads = []
    for prox in (None, old):
        new = scores([[0.5, -0.1, 0.7, -1.2]], [0.3], grad=True)
        out = cacovid_loss(new, old, keep, modes, rewards, CFG, prox=prox)
        out.total.backward()
        grads.append((float(out.total.detach()), new.token.grad.clone(), new.frame.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2])


def test_stale_rollouts_are_clipped_against_the_proximal_policy_and_weighted() -> None:
    # Drawn by a behaviour policy that kept token 0 with p = sigmoid(-4); the learner has since moved to +2.
    old = scores([[-4.0, 0.0]], [0.0])
    prox = scores([[2.0, 0.0]], [0.0])
    keep, modes, rewards = (
        [torch.tensor([0]), torch.tensor([1])],
        torch.tensor([MODE_TOKEN] * 2),
        torch.tensor([1.0, 0.0]),
    )
    new = scores([[2.0, 0.0]], [0.0], grad=True)
    out = cacovid_loss(new, old, keep, modes, rewards, CFG)
    out.total.backward()
    assert new.token.grad[0, 0] == 0.0  # against the behaviour policy: ratio ~ 50, clipped, nothing learnt
    new = scores([[2.0, 0.0]], [0.0], grad=True)
    out = cacovid_loss(new, old, keep, modes, rewards, CFG, prox=prox)
    out.total.backward()
    assert new.token.grad[0, 0] < 0.0  # against the proximal policy: inside the trust region, kept token rises
    assert out.metrics["policy/is_weight_mean"] <= CFG.max_is_weight
    assert out.metrics["policy/clip_frac"] == 0.0
