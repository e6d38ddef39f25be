"""The data-parallel learner group without Ray: 2 ranks (gloo, 2 processes) take the steps 1 learner takes.

The ranks run ``PolicyUpdater.update`` on their shares of the same batches (``learner_group.shard_batch``) with
``TorchGradientSync``; the weights they end with must equal one learner's on the whole batches (float tolerance:
the gradient is summed in another order), the replicas must be byte-identical, and the combined metrics must match.
Also: the flat-buffer binding the learner publishes from survives optimiser steps.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from actors.weights import state_checksum
from cacovid_rl.config import load_config
from cacovid_rl.models.tiny import tiny_llava_onevision
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.rl.update import PolicyUpdater
from learner.learner_group import SHARED_METRICS, ShardResult, TorchGradientSync, combine_metrics, shard_batch
from tests.planted import LEARNER_TEST_OVERRIDES, planted_trajectory

CFG = load_config(
    None,
    [
        *LEARNER_TEST_OVERRIDES,
        "loss.kl_coef=0.01",
    ],
)


def _trajectory(adapter, policy, sample: str, seed: int) -> Trajectory:
    return planted_trajectory(adapter, policy, CFG, sample, frame_seed=seed, reward_seed=seed + 1)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    adapter = tiny_llava_onevision(0)
    policy = CacovidPolicy.from_adapter(adapter)
    # 2 batches: 3 questions (uneven shares: 2 + 1) and 2 questions; version 0 for all (on-policy).
    trajs = [_trajectory(adapter, policy, f"q{i}", 10 * i) for i in range(5)]
    return policy, [trajs[:3], trajs[3:]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, policy_dir: str, batches: list[list[bytes]], out: str) -> None:
    """One rank: its shares of every batch, through the group's sync; writes weights + metrics."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        policy = CacovidPolicy.from_pretrained(policy_dir)
        policy.bind_flat_buffer()
        updater = PolicyUpdater(policy, CFG.learner, CFG.loss, CFG.rollout.iterations)
        updater.sync = TorchGradientSync(rank, world, "cpu")
        metrics = []
        for batch in batches:
            shard = shard_batch([0] * len(batch), 0, 2, world)[rank]
            mine = [Trajectory.from_bytes(batch[i]) for i in shard]
            m = updater.update(mine, version=0, total=len(batch))
            metrics.append({"metrics": m, "fresh": len(mine)})
        bound = policy.flat_buffer() is not None
        state = {k: v.clone() for k, v in policy.state_dict().items()}
        torch.save({"state": state, "metrics": metrics, "checksum": state_checksum(policy), "bound": bound}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_shard_batch_splits_fresh_first_and_covers_everything():
    versions = [5, 5, 1, 5, 5, 5, 2]  # at version 5, window 2: 1 and 2 are stale
    shards = shard_batch(versions, 5, 2, 2)
    assert sorted(i for s in shards for i in s) == list(range(7))
    fresh = [[i for i in s if versions[i] == 5] for s in shards]
    assert fresh == [[0, 1, 3], [4, 5]]
    assert shard_batch(versions[:1], 5, 2, 3) == [[0], [], []]  # fewer questions than ranks: rank 0 gets them


def test_two_learners_take_the_steps_of_one(setup, tmp_path: Path):
    policy, batches = setup
    policy_dir = tmp_path / "policy0"
    policy.save_pretrained(policy_dir)
    # One learner on the whole batches.
    single = CacovidPolicy.from_pretrained(policy_dir)
    single.bind_flat_buffer()
    updater = PolicyUpdater(single, CFG.learner, CFG.loss, CFG.rollout.iterations)
    single_metrics = [updater.update(batch, version=0) for batch in batches]
    assert single.flat_buffer() is not None, "optimiser steps must keep the weights in the published buffer"
    # Two ranks on their shares.
    wire = [[t.to_bytes() for t in batch] for batch in batches]
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(policy_dir), wire, outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, "a rank failed (see its traceback above)"
    ranks = [torch.load(o) for o in outs]
    assert ranks[0]["checksum"] == ranks[1]["checksum"], "the replicas diverged"
    assert ranks[0]["bound"] and ranks[1]["bound"]
    moved = False
    for name, want in single.state_dict().items():
        got = ranks[0]["state"][name]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(want, policy.state_dict()[name])
    assert moved, "the updates must move the weights for the comparison to mean anything"
    for b, want in enumerate(single_metrics):
        results = [
            ShardResult(0, r["metrics"][b]["metrics"], fresh=r["metrics"][b]["fresh"], update_s=1.0) for r in ranks
        ]
        got = combine_metrics(results, len(batches[b]))
        for k, v in want.items():
            if k in SHARED_METRICS or k.startswith(("loss/", "policy/")):
                assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (b, k)


def test_bound_policy_round_trips_and_hashes_like_the_unbound_one(setup):
    policy, _ = setup
    a, b = copy.deepcopy(policy), copy.deepcopy(policy)
    before = state_checksum(a)
    assert a.bind_flat_buffer() and state_checksum(a) == before
    flat, meta = a.flat_state()
    live, live_meta = a.flat_buffer()
    assert live_meta == meta and np.array_equal(live.numpy(), flat)
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    ro = flat.copy()
    ro.setflags(write=False)
    b.load_flat_state(ro, meta)  # binds b, then one copy
    assert b.flat_buffer() is not None and state_checksum(b) == before
    b.to(torch.float64)  # reassigns the weights: the binding is dropped, never trusted stale
    assert b.flat_buffer() is None
