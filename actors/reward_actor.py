"""Ray shell around :class:`cacovid_rl.rl.worker.RewardWorker`: placement, weight sync, liveness.

The actor pulls a newer weight version (one zero-copy object-store read, checksum verified) only
between work items, never mid-question, and echoes the version in every result. After loading it hashes
the weights its policy now holds and reports that checksum (``info`` and every status): a received buffer
proves nothing about what the policy rolls out with (a load that silently does nothing keeps the old
weights under the new version number).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray

from cacovid_rl.config import from_dict
from cacovid_rl.rl.worker import RewardWorker, WorkItem
from learner.weights import WeightHandle, state_checksum

log = logging.getLogger(__name__)


class RewardActor:
    def __init__(self, cfg_dict: dict[str, Any], actor_id: str) -> None:
        self.worker = RewardWorker(from_dict(cfg_dict), actor_id=actor_id)
        self.sync_latency_s = 0.0
        self.sync_load_s = 0.0
        self.syncs = 0
        self.weights_checksum = state_checksum(self.worker.policy)

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "version": self.worker.version,
            "weights_checksum": self.weights_checksum,
        }

    def sync(self, handle: WeightHandle) -> int:
        """Load ``handle`` if it is not the version already held; returns the held version."""
        if handle.version != self.worker.version:
            t0 = time.perf_counter()
            flat = handle.fetch()
            self.worker.set_weights(flat, handle.meta, handle.version)
            # Once per version, about 0.1 s per GB: cheap against the load itself.
            self.weights_checksum = state_checksum(self.worker.policy)
            if self.weights_checksum != handle.checksum:
                log.error(
                    "weight version %d: the policy holds %s, the learner published %s",
                    handle.version,
                    self.weights_checksum,
                    handle.checksum,
                )
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
        status["weights_checksum"] = self.weights_checksum
        status["sync_latency_s"] = self.sync_latency_s
        status["sync_load_s"] = self.sync_load_s
        status["busy_s"] = self.worker.busy_s
        status["alive_s"] = time.time() - self.worker.started
        return status, payload

    def hang(self, seconds: float) -> None:
        """Test hook: block this actor (simulates a hung GPU kernel)."""
        time.sleep(seconds)
