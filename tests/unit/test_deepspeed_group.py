"""DeepSpeed ZeRO across a learner group without Ray: 2 ranks (gloo, 2 processes) take the steps 1 learner takes.

Each rank builds its updater the way a ``learner_group.LearnerWorker`` does (the process group first, with the
environment DeepSpeed reads, then ``deepspeed_updater`` with a ``TorchGradientSync``), so ZeRO partitions the
optimizer state over the ranks and reduces the gradients itself. One learner is the same backend at world size 1 in
its own process (as ``learner.num_learners=1`` runs it). The group's weights must equal the one learner's on the same
batches (float tolerance: the gradients are summed in another order), the replicas must be identical, the combined
metrics must match, and each rank must hold only its own partition of the fp32 master weights.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cacovid_rl.config import load_config
from cacovid_rl.models.tiny import tiny_llava_onevision
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.rl.trajectory import Trajectory
from tests.planted import LEARNER_TEST_OVERRIDES, planted_trajectory

pytest.importorskip("deepspeed")

CFG = load_config(
    None,
    [
        *LEARNER_TEST_OVERRIDES,
        "loss.kl_coef=0.01",
        "learner.backend=deepspeed",
    ],
)


def _trajectory(adapter, policy, sample: str, seed: int) -> Trajectory:
    return planted_trajectory(adapter, policy, CFG, sample, frame_seed=seed, reward_seed=seed + 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, world: int, port: int, stage: int, policy_dir: str, batches: list[list[bytes]], out: str
) -> None:
    """One learner process: its shares of every batch; writes its weights, metrics and optimizer partition."""
    from actors.weights import state_checksum
    from learner.deepspeed_backend import deepspeed_updater
    from learner.learner_group import TorchGradientSync

    torch.set_num_threads(1)
    cfg = CFG.replace(**{"learner.zero_stage": stage})
    addr = "127.0.0.1"
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sync = None
    if world > 1:  # as LearnerWorker.setup: the group's process group exists before the engine is built
        torch.distributed.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world)
        sync = TorchGradientSync(rank, world, "cpu")
    try:
        policy = CacovidPolicy.from_pretrained(policy_dir)
        updater = deepspeed_updater(policy, cfg.learner, cfg.loss, cfg.rollout.iterations)
        updater.sync = sync
        metrics = []
        for batch in batches:
            # Contiguous near-equal shares, rank 0 first: how the group splits a batch of fresh trajectories.
            shard = np.array_split(np.arange(len(batch)), world)[rank]
            mine = [Trajectory.from_bytes(batch[i]) for i in shard]
            metrics.append({"metrics": updater.update(mine, version=0, total=len(batch)), "fresh": len(mine)})
        opt = updater.optimizer_state()
        torch.save(
            {
                "state": {k: v.detach().clone() for k, v in updater.policy.state_dict().items()},
                "metrics": metrics,
                "checksum": state_checksum(updater.policy),
                "partition_numel": sum(int(t.numel()) for t in opt.get("fp32_partitions", [])),
            },
            out,
        )
    finally:
        torch.distributed.destroy_process_group()


def _start(world: int, stage: int, policy_dir: Path, wire: list[list[bytes]], tmp: Path) -> list[tuple[Any, str]]:
    """Start ``world`` learner processes (one process group); each writes its result to the returned path."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    started = []
    for r in range(world):
        out = str(tmp / f"w{world}_rank{r}.pt")
        proc = ctx.Process(target=_rank_main, args=(r, world, port, stage, str(policy_dir), wire, out))
        proc.start()
        started.append((proc, out))
    return started


def _results(started: list[tuple[Any, str]]) -> list[dict[str, Any]]:
    for proc, _ in started:
        proc.join(timeout=600)
        assert proc.exitcode == 0, f"learner process {proc.name} failed: see its traceback above"
    return [torch.load(out) for _, out in started]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_two_deepspeed_learners_take_the_steps_of_one(tmp_path: Path, stage: int):
    torch.manual_seed(0)
    adapter = tiny_llava_onevision(0)
    policy = CacovidPolicy.from_adapter(adapter)
    trajs = [_trajectory(adapter, policy, f"q{i}", 10 * i) for i in range(5)]
    batches = [trajs[:3], trajs[3:]]  # uneven shares (2 + 1), then even ones (1 + 1)
    policy_dir = tmp_path / "policy0"
    policy.save_pretrained(policy_dir)
    wire = [[t.to_bytes() for t in batch] for batch in batches]

    single = _start(1, stage, policy_dir, wire, tmp_path)  # both runs at once: separate process groups
    group = _start(2, stage, policy_dir, wire, tmp_path)
    (one,) = _results(single)
    ranks = _results(group)

    assert ranks[0]["checksum"] == ranks[1]["checksum"], "the replicas diverged"
    numel = sum(int(t.numel()) for t in policy.parameters())
    assert one["partition_numel"] == numel
    # ZeRO 1/2 on 2 ranks: each holds a part of the fp32 masters (DeepSpeed pads them to an even split).
    assert all(numel // 2 <= r["partition_numel"] < numel for r in ranks)
    moved = False
    for name, want in one["state"].items():
        torch.testing.assert_close(ranks[0]["state"][name], want, rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(want, policy.state_dict()[name])
    assert moved, "the updates must move the weights for the comparison to mean anything"

    for b in range(len(batches)):
        want = one["metrics"][b]["metrics"]
        shares = [r["metrics"][b]["metrics"] for r in ranks]
        assert want["policy/grad_norm"] > 0
        # Each rank's loss is its share of the batch mean; the grad norm and LR are the whole batch's on every rank.
        assert sum(m["loss/total"] for m in shares) == pytest.approx(want["loss/total"], rel=1e-4, abs=1e-6), b
        for k in ("policy/grad_norm", "learner/lr", "learner/optimizer_steps"):
            assert shares[0][k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (b, k)
            assert shares[1][k] == pytest.approx(shares[0][k], rel=1e-6), (b, k)
