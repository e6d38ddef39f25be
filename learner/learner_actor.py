"""The learner: owns the policy and optimizer, consumes trajectories, publishes versioned weights.

A plain class; the driver makes it a Ray actor (on the ``learner`` node group on a cluster). It
fetches trajectory payloads straight from the object store (they never pass through the driver),
replays the method's per-iteration optimiser steps and puts the new weights once per version.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ObjectLostError

from cacovid_rl.config import Config, from_dict
from cacovid_rl.models.loading import load_adapter
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.rl.update import PolicyUpdater
from cacovid_rl.rl.worker import build_policy
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.weights import WeightHandle


def make_updater(policy, cfg: Config) -> PolicyUpdater:
    """The one place the optimizer backend is chosen (``learner.backend``)."""
    args = (policy, cfg.learner, cfg.loss, cfg.rollout.iterations, cfg.learner.device)
    if cfg.learner.backend == "deepspeed":
        from learner.deepspeed_backend import DeepSpeedPolicyUpdater

        return DeepSpeedPolicyUpdater(*args)
    return PolicyUpdater(*args)


class Learner:
    def __init__(self, cfg_dict: dict[str, Any], resume_from: str | None = None) -> None:
        cfg: Config = from_dict(cfg_dict)
        self.cfg = cfg
        torch.set_num_threads(cfg.cluster.torch_threads)
        torch.manual_seed(cfg.seed)
        # The LLM is loaded once, only to copy its layer 0 into the policy; it is freed right away.
        adapter = load_adapter(replace(cfg.model, device=cfg.learner.device))
        policy = build_policy(cfg, adapter)
        del adapter
        self.updater = make_updater(policy, cfg)
        self.version = 0
        self.driver_state: dict[str, Any] = {}
        self.recent: dict[int, np.ndarray] = {}
        if resume_from:
            self.driver_state, opt_state, self.recent = load_checkpoint(
                resume_from, self.updater.policy, self.updater.scheduler
            )
            self.updater.load_optimizer_state(opt_state)
            self.version = int(self.driver_state["version"])
            self.updater.optimizer_steps = int(self.driver_state.get("optimizer_steps", 0))
        self._remember(self.version)

    # -- weights -------------------------------------------------------------------------------
    def _flat(self) -> tuple[np.ndarray, dict[str, Any]]:
        return self.updater.policy.flat_state()

    def _remember(self, version: int) -> np.ndarray:
        """Flatten the policy once for ``version``; keep the last ``max_staleness + 1`` buffers (for exact resume)."""
        flat, self._meta = self._flat()  # flat_state returns a fresh buffer: no copy needed
        self.recent[version] = flat
        for v in [v for v in self.recent if v < version - self.cfg.learner.max_staleness]:
            del self.recent[v]
        return flat

    def publish(self) -> WeightHandle:
        return WeightHandle.publish(self.recent[self.version], self._meta, self.version)

    def publish_recent(self) -> dict[int, WeightHandle]:
        """All remembered versions (after a resume, in-flight batches need the older ones)."""
        return {v: WeightHandle.publish(buf, self._meta, v) for v, buf in self.recent.items()}

    def resume_state(self) -> dict[str, Any]:
        return dict(self.driver_state)

    # -- update --------------------------------------------------------------------------------
    def update(self, statuses: list[dict[str, Any]], payload_refs: list[ray.ObjectRef]) -> dict[str, Any]:
        """One policy update on one batch of questions (ordered by data index); bumps the version.

        If a trajectory cannot be fetched (its object lived on a node that has since left the cluster),
        nothing is updated: the positions of the lost payloads come back as ``{"lost": [...]}`` so the
        driver re-dispatches those questions and submits the batch again.
        """
        t0 = time.perf_counter()
        try:
            payloads = ray.get(payload_refs, timeout=600) if payload_refs else []  # one concurrent fetch
        except ObjectLostError:
            # A node left after its rollout finished; find which payloads went with it (the driver re-runs them).
            lost = []
            for i, ref in enumerate(payload_refs):
                try:
                    ray.get(ref, timeout=600)
                except ObjectLostError:
                    lost.append(i)
            return {"lost": lost, "version": self.version}
        trajs = [Trajectory.from_bytes(p) for p in payloads]
        fresh = [t for t in trajs if self.version - t.weight_version <= self.cfg.learner.max_staleness]
        t1 = time.perf_counter()
        metrics = self.updater.update(fresh, version=self.version) if fresh else {}
        self.version += 1
        self._remember(self.version)
        staleness = [self.version - 1 - t.weight_version for t in trajs]
        rewards = np.concatenate([t.rewards for t in trajs]) if trajs else np.zeros(0)
        metrics.update(
            {
                "reward/mean": float(rewards.mean()) if rewards.size else float("nan"),
                "reward/std": float(rewards.std()) if rewards.size else float("nan"),
                "rollout/rate_mean": float(np.mean([t.rates.mean() for t in trajs])) if trajs else float("nan"),
                "policy/staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
                "policy/staleness_max": float(max(staleness, default=0)),
                "data/dropped_stale": float(len(trajs) - len(fresh)),
                "data/questions": float(len(fresh)),
                "transfer/bytes_per_question": float(np.mean([len(p) for p in payloads])) if payloads else 0.0,
                "timing/learner_fetch": t1 - t0,
                "timing/learner_update": time.perf_counter() - t1,
                "learner/questions_per_s": len(fresh) / max(1e-9, time.perf_counter() - t1),
            }
        )
        return {"metrics": metrics, "handle": self.publish(), "version": self.version}

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, root: str, driver_state: dict[str, Any]) -> str:
        state = dict(driver_state, version=self.version, optimizer_steps=self.updater.optimizer_steps)
        path = save_checkpoint(
            root,
            self.version,
            self.updater.policy,
            self.updater.optimizer_state(),
            self.updater.scheduler,
            state,
            recent_weights={v: w for v, w in self.recent.items() if v < self.version},
            keep=self.cfg.learner.keep_checkpoints,
        )
        return str(path)

    def save_policy(self, out_dir: str) -> str:
        self.updater.policy.save_pretrained(Path(out_dir))
        return out_dir

    def weights_checksum(self) -> str:
        from learner.weights import checksum

        return checksum(self.recent[self.version])
