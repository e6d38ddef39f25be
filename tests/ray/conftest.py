"""Fixtures for tests that run the real driver on a real local Ray instance or cluster."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cacovid_rl.config import Config, load_config


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    from cacovid_rl.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, n=40, seed=7)
    return out


def make_cfg(out: Path, data: Path, *overrides: str) -> Config:
    """A small debug config: shipped tiny model, 2 actors, short rollouts, no wandb."""
    base = [
        "model.path=tiny",
        f"data.train_path={data / 'train.json'}",
        f"data.eval_path={data / 'test.json'}",
        f"data.video_root={data}",
        "data.num_frames=8",
        "sampling.num_content=1",
        "sampling.num_token=5",
        "sampling.num_frame=2",
        "sampling.rate=0.125",
        "rollout.iterations=2",
        "learner.lr=1e-3",
        "learner.total_steps=4",
        "learner.questions_per_step=2",
        "learner.max_staleness=1",
        "learner.checkpoint_every=2",
        f"learner.checkpoint_dir={out / 'ckpt'}",
        "cluster.min_actors=2",
        "cluster.max_actors=2",
        "cluster.num_cpus=2",
        "cluster.object_store_memory_mb=200",
        "cluster.call_timeout_s=120",
        "cluster.pool_resize_every_s=0.5",
        "eval.every_steps=0",
        "wandb.mode=disabled",
        f"output_dir={out}",
    ]
    return load_config(None, base + list(overrides))


@pytest.fixture
def local_ray():
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # address="local": always a new instance, never another process's cluster on this machine.
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False)
    yield ray
    ray.shutdown()


# A multi-node cluster as on a real deployment: the learner on the head (its own resource), reward
# actors on worker nodes that carry the `reward_actor` resource.
CLUSTER_OVERRIDES = (
    "cluster.actor_resource=reward_actor",
    "cluster.min_actors=1",
    "cluster.max_actors=2",
    "cluster.actor_num_cpus=0",
    "learner.placement_resource=learner",
)


class SimulatedCluster:
    def __init__(self, reward_nodes: int) -> None:
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "resources": {"learner": 1}, "object_store_memory": 150 * 1024**2},
        )
        self.nodes = [self.add_reward_node() for _ in range(reward_nodes)]
        ray.init(address=self.cluster.address)

    def add_reward_node(self):
        return self.cluster.add_node(num_cpus=1, resources={"reward_actor": 1}, object_store_memory=100 * 1024**2)

    def remove_node(self, node) -> None:
        self.cluster.remove_node(node)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture
def simulated_cluster():
    """``make(n)`` starts a head + ``n`` reward nodes and connects; shut down after the test."""
    made: list[SimulatedCluster] = []

    def make(reward_nodes: int) -> SimulatedCluster:
        made.append(SimulatedCluster(reward_nodes))
        return made[-1]

    yield make
    for c in made:
        c.shutdown()


class BackgroundRun:
    """``learner.driver.train`` in a thread, stoppable through ``should_stop``."""

    def __init__(self, cfg: Config) -> None:
        import threading

        from learner.driver import train

        self.summary: dict | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(train, cfg), daemon=True)
        self.thread.start()

    def _run(self, train, cfg: Config) -> None:
        self.summary = train(cfg, should_stop=self.stop.is_set)

    def join(self, timeout: float) -> dict:
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), "training did not finish"
        assert self.summary is not None, "training raised (see the thread's traceback above)"
        return self.summary


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
