"""The Ray-free learning path: rollout -> trajectory -> update, checkpoints, and the DeepSpeed backend."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from cacovid_rl.config import load_config
from cacovid_rl.models.tiny import tiny_llava_onevision
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.rl.rollout import next_rate
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.rl.update import PolicyUpdater
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tests.planted import LEARNER_TEST_OVERRIDES, planted_trajectory

CFG = load_config(None, list(LEARNER_TEST_OVERRIDES))


@pytest.fixture(scope="module")
def adapter():
    return tiny_llava_onevision(0)


def _trajectory(adapter, policy, sample: str, rewards_from: int = 0) -> Trajectory:
    return planted_trajectory(
        adapter, policy, CFG, sample, frame_seed=abs(hash(sample)) % 2**32, reward_seed=rewards_from
    )


def test_next_rate_follows_the_method():
    r = CFG.rollout
    assert next_rate(0.02, 0.9, r) == 0.01
    assert next_rate(0.011, 1.0, r) == r.min_rate
    assert next_rate(0.02, 0.1, r) == 0.04
    assert next_rate(0.1, 0.0, r) == r.max_rate
    assert next_rate(0.02, 0.5, r) == 0.02


def test_rollout_trajectory_shapes_and_determinism(adapter):
    policy = CacovidPolicy.from_adapter(adapter)
    a = _trajectory(adapter, policy, "q1")
    b = _trajectory(adapter, policy, "q1")
    assert a.num_samples == CFG.sampling.num_samples * CFG.rollout.iterations
    np.testing.assert_array_equal(a.keep_flat, b.keep_flat)  # seeded by sample, not by process
    assert len(a.rates) == CFG.rollout.iterations and set(a.iterations.tolist()) == {0, 1, 2}
    assert a.inputs_embeds.shape[1] == adapter.hidden_size and a.nbytes > 0


def test_update_moves_the_policy_and_replays_iterations(adapter):
    policy = CacovidPolicy.from_adapter(adapter)
    trajs = [_trajectory(adapter, policy, f"q{i}", rewards_from=i) for i in range(2)]
    before = [p.detach().clone() for p in policy.parameters()]
    updater = PolicyUpdater(policy, CFG.learner, CFG.loss, CFG.rollout.iterations)
    metrics = updater.update(trajs)
    assert updater.optimizer_steps == CFG.rollout.iterations
    assert np.isfinite(metrics["loss/total"]) and metrics["policy/grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    with pytest.raises(ValueError, match="at least one"):
        updater.update([])


def test_stale_trajectories_get_the_proximal_loss_and_fresh_ones_do_not(adapter):
    policy = CacovidPolicy.from_adapter(adapter)
    trajs = [_trajectory(adapter, policy, f"q{i}", rewards_from=i) for i in range(2)]  # rolled out at version 0
    updater = PolicyUpdater(copy.deepcopy(policy), CFG.learner, CFG.loss, CFG.rollout.iterations)
    assert updater.proximal_scores(trajs, version=0) == [None, None] and updater.proximal_scores(trajs, None) == [
        None,
        None,
    ]
    on_policy = PolicyUpdater(copy.deepcopy(policy), CFG.learner, CFG.loss, CFG.rollout.iterations)
    a, b = updater.update(trajs, version=0), on_policy.update(trajs)  # same loss, same weights
    assert a["learner/stale_trajectories"] == 0 and a["loss/total"] == pytest.approx(b["loss/total"])
    for x, y in zip(updater.policy.parameters(), on_policy.policy.parameters(), strict=True):
        torch.testing.assert_close(x, y)
    # One update later the same trajectories are one version old: scored again by the learner's own policy.
    prox = updater.proximal_scores(trajs, version=1)
    assert all(p is not None and not p.token.requires_grad for p in prox)
    assert not torch.equal(prox[0].token, trajs[0].old_scores().token)
    metrics = updater.update(trajs, version=1)
    assert metrics["learner/stale_trajectories"] == 2 and 0 < metrics["policy/is_weight_mean"] <= CFG.loss.max_is_weight


def test_checkpoint_resume_equals_uninterrupted(adapter, tmp_path: Path):
    torch.manual_seed(0)
    base = CacovidPolicy.from_adapter(adapter)
    batches = [[_trajectory(adapter, base, f"q{i}{j}", rewards_from=10 * i + j) for j in range(2)] for i in range(3)]

    straight = PolicyUpdater(copy.deepcopy(base), CFG.learner, CFG.loss, CFG.rollout.iterations)
    losses = [straight.update(b)["loss/total"] for b in batches]

    first = PolicyUpdater(copy.deepcopy(base), CFG.learner, CFG.loss, CFG.rollout.iterations)
    first.update(batches[0])
    for step in (1, 2, 3):  # also checks pruning to the newest `keep`
        save_checkpoint(tmp_path, step, first.policy, first.optimizer_state(), first.scheduler, {"version": 1})
    path = latest_checkpoint(tmp_path)
    assert path is not None and path.name == "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert not any(p.suffix == ".pickle" or p.suffix == ".pt" for p in path.rglob("*"))

    resumed = PolicyUpdater(copy.deepcopy(base), CFG.learner, CFG.loss, CFG.rollout.iterations)
    driver_state, opt_state, _ = load_checkpoint(path, resumed.policy, resumed.scheduler)
    resumed.load_optimizer_state(opt_state)
    assert driver_state == {"version": 1}
    got = [resumed.update(b)["loss/total"] for b in batches[1:]]
    assert got == pytest.approx(losses[1:], rel=1e-6, abs=1e-9)
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_deepspeed_backend_matches_torch(adapter):
    from learner.deepspeed_backend import deepspeed_updater

    torch.manual_seed(0)
    base = CacovidPolicy.from_adapter(adapter)
    batch = [_trajectory(adapter, base, f"d{j}", rewards_from=j) for j in range(2)]
    ref = PolicyUpdater(copy.deepcopy(base), CFG.learner, CFG.loss, CFG.rollout.iterations)
    ref_metrics = ref.update(batch)
    ds_cfg = CFG.replace(**{"learner.backend": "deepspeed", "learner.zero_stage": 2})
    ds = deepspeed_updater(copy.deepcopy(base), ds_cfg.learner, ds_cfg.loss, ds_cfg.rollout.iterations)
    ds_metrics = ds.update(batch)
    assert ds_metrics["loss/total"] == pytest.approx(ref_metrics["loss/total"], rel=1e-5)
    for a, b in zip(ref.policy.parameters(), ds.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="stage 3"):
        bad = CFG.replace(**{"learner.backend": "deepspeed", "learner.zero_stage": 3})
        deepspeed_updater(copy.deepcopy(base), bad.learner, bad.loss, 1)


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_resume_equals_uninterrupted(adapter, tmp_path: Path, stage: int):
    """Stop after one update, checkpoint, rebuild the engine the way the learner does on ``--resume`` (fresh
    engine, ``load_checkpoint`` then ``load_optimizer_state``), and the next updates must be those of the run that
    never stopped. The restore has real work to do: Adam's moments and, at ZeRO 1-2, the fp32 master copies that
    the engine steps (not the module weights ``load_checkpoint`` writes), so skipping either shows here."""
    from learner.deepspeed_backend import deepspeed_updater

    cfg = CFG.replace(**{"learner.backend": "deepspeed", "learner.zero_stage": stage})

    def make() -> PolicyUpdater:
        return deepspeed_updater(copy.deepcopy(base), cfg.learner, cfg.loss, cfg.rollout.iterations)

    torch.manual_seed(0)
    base = CacovidPolicy.from_adapter(adapter)
    batches = [[_trajectory(adapter, base, f"z{i}{j}", rewards_from=7 * i + j) for j in range(2)] for i in range(3)]
    straight = make()
    losses = [straight.update(b)["loss/total"] for b in batches]

    first = make()
    first.update(batches[0])
    save_checkpoint(tmp_path, 1, first.policy, first.optimizer_state(), first.scheduler, {"version": 1})
    del first
    resumed = make()
    _, opt_state, _ = load_checkpoint(latest_checkpoint(tmp_path), resumed.policy, resumed.scheduler)
    resumed.load_optimizer_state(opt_state)
    resumed.optimizer_steps = CFG.rollout.iterations
    got = [resumed.update(b)["loss/total"] for b in batches[1:]]
    assert got == pytest.approx(losses[1:], rel=1e-6, abs=1e-9)
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_update_without_signal_leaves_the_weights_alone(adapter):
    """Equal rewards give all-zero advantages and gradients: no AdamW step (momentum/weight decay would move the
    weights anyway), the schedule still advances; a batch where one question's rewards vary does step."""
    policy = CacovidPolicy.from_adapter(adapter)
    updater = PolicyUpdater(policy, CFG.learner, CFG.loss, CFG.rollout.iterations)
    updater.update([_trajectory(adapter, policy, "s0", rewards_from=0)])  # real steps: Adam now has momentum
    flat = _trajectory(adapter, policy, "s1")
    flat.rewards = np.ones_like(flat.rewards)
    assert not updater.has_signal([flat], CFG.rollout.iterations - 1)
    before = [p.detach().clone() for p in policy.parameters()]
    lr_before = updater.scheduler.get_last_lr()[0]
    metrics = updater.update([flat])
    for a, b in zip(before, policy.parameters(), strict=True):
        assert torch.equal(a, b)
    assert metrics["learner/skipped_steps"] == CFG.rollout.iterations
    assert metrics["policy/grad_norm"] == 0.0 and np.isfinite(metrics["loss/total"])
    assert updater.optimizer_steps == 2 * CFG.rollout.iterations
    assert updater.scheduler.get_last_lr()[0] != lr_before  # the schedule moved on
    varied = _trajectory(adapter, policy, "s2", rewards_from=2)
    assert updater.has_signal([flat, varied], 0)
    updater.update([flat, varied])
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
