"""Ray shell around :class:`cacovid_rl.rl.worker.RewardWorker`: placement, weight sync, liveness.

The actor pulls a newer weight version (one zero-copy object-store read, checksum verified) only
between work items, never mid-question, and echoes the version in every result.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from cacovid_rl.config import from_dict
from cacovid_rl.rl.worker import RewardWorker, WorkItem
from learner.weights import WeightHandle


class RewardActor:
    def __init__(self, cfg_dict: dict[str, Any], actor_id: str) -> None:
        self.worker = RewardWorker(from_dict(cfg_dict), actor_id=actor_id)
        self.sync_latency_s = 0.0
        self.sync_load_s = 0.0
        self.syncs = 0

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "version": self.worker.version}

    def sync(self, handle: WeightHandle) -> int:
        """Load ``handle`` if it is not the version already held; returns the held version."""
        if handle.version != self.worker.version:
            t0 = time.perf_counter()
            flat = handle.fetch()
            self.worker.set_weights(flat, handle.meta, handle.version)
            self.sync_load_s = time.perf_counter() - t0
            self.sync_latency_s = time.time() - handle.published_at
            self.syncs += 1
        return self.worker.version

    @ray.method(num_returns=2)
    def run(self, item: dict[str, Any], handle: WeightHandle) -> tuple[dict[str, Any], bytes]:
        synced_before = self.syncs
        self.sync(handle)
        status, payload = self.worker.run(WorkItem(**item))
        status["synced"] = self.syncs > synced_before
        status["sync_latency_s"] = self.sync_latency_s
        status["sync_load_s"] = self.sync_load_s
        status["busy_s"] = self.worker.busy_s
        status["alive_s"] = time.time() - self.worker.started
        return status, payload

    def hang(self, seconds: float) -> None:
        """Test hook: block this actor (simulates a hung GPU kernel)."""
        time.sleep(seconds)
