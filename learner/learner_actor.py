"""The learner: owns the policy and optimizer, consumes trajectories, publishes versioned weights.

A plain class; the driver makes it a Ray actor (on the ``learner`` node group on a cluster). It
fetches trajectory payloads straight from the object store (they never pass through the driver),
replays the method's per-iteration optimiser steps and puts the new weights once per version.

With the torch backend the policy's weights are views into one flat buffer
(``CacovidPolicy.bind_flat_buffer``), so publishing a version is one ``ray.put`` of memory that already exists;
the learner keeps the handles of the last ``max_staleness + 1`` versions (not copies of their buffers) and reads
them back from the object store only to checkpoint them. ``learner/learner_group.py`` runs several of these as
data-parallel ranks (``learner.num_learners``), of which only rank 0 publishes.

Every update's metrics include the learner's own device readings (``mem/learner_*``, ``perf/learner_*``;
``learner/monitoring.py::learner_metrics``): wandb's system monitor runs in the driver, which on a cluster is a
GPU-less head node, so nothing else records the learner's GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ObjectLostError

from actors.weights import WeightHandle, publish_policy, state_checksum
from cacovid_rl.config import Config, from_dict
from cacovid_rl.device_stats import DeviceMonitor
from cacovid_rl.models.loading import load_adapter
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.rl.update import GradientSync, PolicyUpdater
from cacovid_rl.rl.worker import RolloutStatus
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.monitoring import learner_metrics


@dataclass(frozen=True)
class UpdateResult:
    """What one ``update`` call did (the learner -> driver message).

    Applied: the learner is now at ``version`` (the batch's version + 1), ``handle`` publishes it and ``metrics`` are
    the update's. Not applied (``lost`` non-empty): trajectories at these positions of the batch were lost with their
    node, nothing was updated and ``version`` is unchanged; the driver rolls those questions out again and resubmits.
    """

    version: int
    metrics: dict[str, float] = field(default_factory=dict)
    handle: WeightHandle | None = None
    lost: tuple[int, ...] = ()

    @property
    def applied(self) -> bool:
        return not self.lost


def make_updater(policy, cfg: Config) -> PolicyUpdater:
    """The one place the optimizer backend is chosen (``learner.backend``)."""
    args = (policy, cfg.learner, cfg.loss, cfg.rollout.iterations, cfg.learner.device)
    if cfg.learner.backend == "deepspeed":
        from learner.deepspeed_backend import deepspeed_updater

        return deepspeed_updater(*args)
    return PolicyUpdater(*args)


def fetch_payloads(payload_refs: list[ray.ObjectRef]) -> tuple[list[bytes], list[int]]:
    """The payloads (one concurrent fetch), or the positions of those that were lost with their node."""
    try:
        return (ray.get(payload_refs, timeout=600) if payload_refs else []), []
    except ObjectLostError:
        # A node left after its rollout finished; find which payloads went with it (the driver re-runs them).
        lost = []
        for i, ref in enumerate(payload_refs):
            try:
                ray.get(ref, timeout=600)
            except ObjectLostError:
                lost.append(i)
        return [], lost


def batch_metrics(trajs: list[Trajectory], payloads: list[bytes], fresh: int, version: int) -> dict[str, float]:
    """Rewards, rates, staleness and transfer size of one batch, as the driver logs them."""
    staleness = [version - t.weight_version for t in trajs]
    rewards = np.concatenate([t.rewards for t in trajs]) if trajs else np.zeros(0)
    return {
        "reward/mean": float(rewards.mean()) if rewards.size else float("nan"),
        "reward/std": float(rewards.std()) if rewards.size else float("nan"),
        "rollout/rate_mean": float(np.mean([t.rates.mean() for t in trajs])) if trajs else float("nan"),
        "policy/staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
        "policy/staleness_max": float(max(staleness, default=0)),
        "data/dropped_stale": float(len(trajs) - fresh),
        "data/questions": float(fresh),
        "transfer/bytes_per_question": float(np.mean([len(p) for p in payloads])) if payloads else 0.0,
    }


class Learner:
    def __init__(
        self,
        cfg_dict: dict[str, Any],
        resume_from: str | None = None,
        sync: GradientSync | None = None,
        publishes: bool = True,
    ) -> None:
        """``sync`` and ``publishes``: set by ``learner/learner_group.py`` for its ranks (gradient all-reduce;
        only rank 0 puts weight versions). A single learner leaves both at their defaults."""
        cfg: Config = from_dict(cfg_dict)
        self.cfg = cfg
        torch.set_num_threads(cfg.cluster.torch_threads)
        torch.manual_seed(cfg.seed)
        # The LLM is loaded once, only to copy its layer 0 into the policy; it is freed right away.
        adapter = load_adapter(replace(cfg.model, device=cfg.learner.device))
        policy = CacovidPolicy.from_adapter(adapter, cfg.policy)
        del adapter
        self.updater = make_updater(policy, cfg)
        self.updater.sync = sync
        # Peaks from here on: the LLM loaded above is gone, and counting it would hide the update's own footprint.
        self.monitor = DeviceMonitor(cfg.learner.device)
        self.monitor.reset_peak()
        self._last_update_end: float | None = None
        if cfg.learner.backend == "torch":
            # DeepSpeed keeps the weights in its own flat buffers (and reassigns ``.data``): no binding there.
            self.updater.policy.bind_flat_buffer()
        self.publishes = publishes
        self.version = 0
        self.driver_state: dict[str, Any] = {}
        self.handles: dict[int, WeightHandle] = {}
        self._resumed: dict[int, np.ndarray] = {}
        if resume_from:
            self.driver_state, opt_state, self._resumed = load_checkpoint(
                resume_from, self.updater.policy, self.updater.scheduler
            )
            if isinstance(opt_state, dict) and "ranks" in opt_state:  # a learner group's ZeRO partitions
                rank, world = getattr(sync, "rank", 0), getattr(sync, "world_size", 1)
                if len(opt_state["ranks"]) != world:
                    raise ValueError(
                        f"{resume_from} holds the ZeRO optimizer partitions of {len(opt_state['ranks'])} learners; "
                        f"resume it with learner.num_learners={len(opt_state['ranks'])} (not {world})"
                    )
                opt_state = opt_state["ranks"][rank]
            self.updater.load_optimizer_state(opt_state)
            self.version = int(self.driver_state["version"])
            self.updater.optimizer_steps = int(self.driver_state.get("optimizer_steps", 0))
        self._meta = self.updater.policy._flat_layout()[1]
        if publishes:
            self.publish_initial()

    def publish_initial(self) -> None:
        """Put the current version and, after a resume, the older ones in-flight batches may still need (exact
        resume), each once. A learner group's rank 0 calls it after the ranks agreed on their weights."""
        self.publishes = True
        older = {v: buf for v, buf in self._resumed.items() if v < self.version}
        self.handles = {v: WeightHandle.publish(buf, self._meta, v) for v, buf in older.items()}
        self._resumed = {}
        self._remember(self.version)

    # -- weights -------------------------------------------------------------------------------
    def _remember(self, version: int) -> None:
        """Publish ``version`` once (one put of the bound buffer, or of a fresh flat copy when the policy is not
        bound) and keep the handles of the last ``max_staleness + 1`` versions (their objects serve in-flight
        batches and exact resume; the driver holds the same references, so this costs no memory of its own)."""
        if not self.publishes:
            return
        self.handles[version] = publish_policy(self.updater.policy, version)
        for v in [v for v in self.handles if v < version - self.cfg.learner.max_staleness]:
            del self.handles[v]

    def publish(self) -> WeightHandle:
        """The current version's handle (put once, when the version was made)."""
        return self.handles[self.version]

    def publish_recent(self) -> dict[int, WeightHandle]:
        """All remembered versions (after a resume, in-flight batches need the older ones)."""
        return dict(self.handles)

    def recent_weights(self) -> dict[int, np.ndarray]:
        """The buffers of the remembered versions older than the current one, read back (zero-copy on this node,
        checksum verified) from the object store: what a checkpoint stores for exact resume."""
        return {v: h.fetch() for v, h in self.handles.items() if v < self.version}

    def resume_state(self) -> dict[str, Any]:
        return dict(self.driver_state)

    # -- update --------------------------------------------------------------------------------
    def update(self, statuses: list[RolloutStatus], payload_refs: list[ray.ObjectRef]) -> UpdateResult:
        """One policy update on one batch of questions (ordered by data index); bumps the version.

        ``statuses`` are the batch's rollout statuses: the same call as ``LearnerGroup.update``, which reads their
        weight versions to shard the batch; one learner reads everything from the trajectories themselves.

        If a trajectory cannot be fetched (its object lived on a node that has since left the cluster), nothing is
        updated and the result names the lost positions (see :class:`UpdateResult`).
        """
        t0 = time.perf_counter()
        payloads, lost = fetch_payloads(payload_refs)
        if lost:
            return UpdateResult(self.version, lost=tuple(lost))
        trajs = [Trajectory.from_bytes(p) for p in payloads]
        fresh = [t for t in trajs if self.version - t.weight_version <= self.cfg.learner.max_staleness]
        t1 = time.perf_counter()
        metrics = self.updater.update(fresh, version=self.version) if fresh else {}
        self.version += 1
        self._remember(self.version)
        metrics.update(batch_metrics(trajs, payloads, len(fresh), self.version - 1))
        metrics.update(
            {
                "timing/learner_fetch": t1 - t0,
                "timing/learner_update": time.perf_counter() - t1,
                "learner/questions_per_s": len(fresh) / max(1e-9, time.perf_counter() - t1),
            }
        )
        metrics.update(self.device_metrics(time.perf_counter() - t0, sum(t.num_samples for t in fresh)))
        return UpdateResult(self.version, metrics, self.publish())

    def device_metrics(self, busy_s: float, combos: int) -> dict[str, float]:
        """This learner's memory, utilisation and throughput after an update that took ``busy_s`` and trained on
        ``combos`` combinations (``learner/monitoring.py::learner_metrics``). ``perf/learner_busy`` is the share of
        the time since the previous update ended that this one took: well below 1, the learner waits for rollouts."""
        now = time.perf_counter()
        window = busy_s if self._last_update_end is None else now - self._last_update_end
        self._last_update_end = now
        return learner_metrics(self.monitor.stats(), busy_s, window, combos)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, root: str, driver_state: dict[str, Any]) -> str:
        return self.save_with(root, driver_state, self.updater.optimizer_state())

    def save_with(self, root: str, driver_state: dict[str, Any], optimizer_state: Any) -> str:
        """Write the checkpoint with ``optimizer_state`` (a learner group passes every rank's ZeRO partition)."""
        state = dict(driver_state, version=self.version, optimizer_steps=self.updater.optimizer_steps)
        path = save_checkpoint(
            root,
            self.version,
            self.updater.policy,
            optimizer_state,
            self.updater.scheduler,
            state,
            recent_weights=self.recent_weights(),
            keep=self.cfg.learner.keep_checkpoints,
        )
        return str(path)

    def save_policy(self, out_dir: str) -> str:
        self.updater.policy.save_pretrained(Path(out_dir))
        return out_dir

    def weights_checksum(self) -> str:
        """The checksum of the current version's weights (what every actor verifies against)."""
        if self.publishes:
            return self.handles[self.version].checksum
        return state_checksum(self.updater.policy)
