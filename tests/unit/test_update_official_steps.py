"""``learner.skip_no_signal_steps=false`` steps as the official trainer does, even when every advantage is 0."""

from __future__ import annotations

import numpy as np
import torch

from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.rl.update import PolicyUpdater
from tests.unit.test_update_checkpoint import CFG, _trajectory, adapter  # noqa: F401  (adapter is a fixture)


def test_official_updates_step_without_signal(adapter):  # noqa: F811
    """With the switch off, AdamW steps on an all-zero-advantage batch (momentum from the first batch moves the
    weights); with it on (default) the weights stay put. The same two batches drive both updaters."""
    first = _trajectory(adapter, CacovidPolicy.from_adapter(adapter), "s0", rewards_from=0)
    flat = _trajectory(adapter, CacovidPolicy.from_adapter(adapter), "s1")
    flat.rewards = np.ones_like(flat.rewards)
    moved = {}
    for skip in (True, False):
        torch.manual_seed(0)
        policy = CacovidPolicy.from_adapter(adapter)
        learner = CFG.replace(**{"learner.skip_no_signal_steps": skip}).learner
        updater = PolicyUpdater(policy, learner, CFG.loss, CFG.rollout.iterations)
        updater.update([first])
        before = [p.detach().clone() for p in policy.parameters()]
        metrics = updater.update([flat])
        moved[skip] = any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
        assert metrics["learner/skipped_steps"] == (CFG.rollout.iterations if skip else 0)
    assert moved == {True: False, False: True}
