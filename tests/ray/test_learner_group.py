"""The data-parallel learner group (``learner.num_learners`` = 2) in the real driver on real Ray.

- 2 learners train like 1 on the same batches (the pipeline is deterministic, so the batches are the same);
- rank 0 alone publishes, and every replica holds what it published;
- a learner rank killed mid-run ends the run with a clear error; the newest checkpoint (written atomically by
  rank 0 before the failure) is intact and ``--resume`` finishes with exactly the uninterrupted run's weights;
- on a cluster the ranks are placed by the ``learner`` resource, one per learner node.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from tests.ray.conftest import make_cfg, read_metrics, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _policy_state(path: Path) -> dict[str, torch.Tensor]:
    from cacovid_rl.policy.network import CacovidPolicy

    return CacovidPolicy.from_pretrained(path).state_dict()


def test_two_learners_train_like_one(local_ray, tmp_path: Path, synthetic_dir: Path):
    from learner.driver import train

    runs = {}
    for n in (1, 2):
        cfg = make_cfg(tmp_path / f"n{n}", synthetic_dir, f"learner.num_learners={n}", "loss.kl_coef=0.01")
        runs[n] = (train(cfg), read_metrics(tmp_path / f"n{n}"))
    (one, m1), (two, m2) = runs[1], runs[2]
    assert two["version"] == one["version"] == 4
    assert sorted(two["counters"]["consumed_indices"]) == list(range(8))
    assert [r["step"] for r in m2] == [1, 2, 3, 4]
    assert all(r["learner/num_learners"] == 2 for r in m2)
    for a, b in zip(m1, m2, strict=True):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-3, abs=1e-6)
        assert b["reward/mean"] == pytest.approx(a["reward/mean"])
        assert b["reward/std"] == pytest.approx(a["reward/std"], rel=1e-6, abs=1e-9)
        assert b["policy/grad_norm"] == pytest.approx(a["policy/grad_norm"], rel=1e-3, abs=1e-6)
    sa, sb = _policy_state(Path(one["policy_dir"])), _policy_state(Path(two["policy_dir"]))
    for name, want in sa.items():
        torch.testing.assert_close(sb[name], want, rtol=1e-4, atol=1e-6, msg=name)


class _Run:
    """``train`` in a thread; keeps the exception it ended with."""

    def __init__(self, cfg, **kw) -> None:
        from learner.driver import train

        self.summary, self.error = None, None

        def run() -> None:
            try:
                self.summary = train(cfg, **kw)
            except Exception as exc:  # the test inspects it
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "training did not end"


def test_killed_learner_rank_ends_the_run_and_resume_is_exact(local_ray, tmp_path: Path, synthetic_dir: Path):
    import ray

    from learner.checkpoint import latest_checkpoint
    from learner.driver import train

    over = ("learner.num_learners=2", "learner.total_steps=6", "loss.kl_coef=0.01")
    full = train(make_cfg(tmp_path / "full", synthetic_dir, *over))
    assert full["version"] == 6

    cfg = make_cfg(tmp_path / "killed", synthetic_dir, *over)
    ckpt = Path(cfg.learner.checkpoint_dir)
    run = _Run(cfg)
    wait_for(lambda: latest_checkpoint(ckpt) is not None, 300, "the first checkpoint")
    names = [n for n in ray.util.list_named_actors() if n.startswith("cacovid-learner-") and n.endswith("-rank1")]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]), no_restart=True)
    run.join(300)
    assert run.error is not None and "learner rank 1 of 2 failed" in str(run.error), run.error
    saved = latest_checkpoint(ckpt)
    assert saved is not None and saved.name in {"step_00000002", "step_00000004"}
    assert not list(ckpt.glob("*.tmp")), "no half-written checkpoint is left behind"

    time.sleep(1.0)  # let Ray reap the killed group before the next one starts
    resumed = train(cfg, resume=True)
    assert resumed["version"] == 6
    assert sorted(resumed["counters"]["consumed_indices"]) == list(range(12))
    assert resumed["weights_checksum"] == full["weights_checksum"], "resume must continue exactly"


def test_ranks_are_placed_by_the_learner_resource(tmp_path: Path, synthetic_dir: Path):
    """Two learner nodes (``learner: 1`` each) and one reward node: each rank lands on its own learner node, the
    process group spans them, and the run completes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 1024**2})
    learner_nodes = [
        cluster.add_node(num_cpus=0, resources={"learner": 1}, object_store_memory=100 * 1024**2) for _ in range(2)
    ]
    cluster.add_node(num_cpus=1, resources={"reward_actor": 1}, object_store_memory=100 * 1024**2)
    ray.init(address=cluster.address)
    try:
        cfg = make_cfg(
            tmp_path,
            synthetic_dir,
            "learner.num_learners=2",
            "learner.placement_resource=learner",
            "cluster.actor_resource=reward_actor",
            "cluster.min_actors=1",
            "cluster.max_actors=1",
            "cluster.actor_num_cpus=0",
            "learner.total_steps=2",
        )
        placed: dict[str, str] = {}

        def record() -> bool:
            from ray.util.state import list_actors

            for a in list_actors(filters=[("state", "=", "ALIVE")]):
                if (a.name or "").startswith("cacovid-learner-"):
                    placed[a.name[-5:]] = a.node_id
            return len(placed) == 2

        run = _Run(cfg)
        wait_for(record, 300, "both learner ranks alive")
        run.join(300)
        assert run.error is None, run.error
        assert run.summary["version"] == 2
        assert set(placed.values()) == {n.node_id for n in learner_nodes}
    finally:
        ray.shutdown()
        cluster.shutdown()
