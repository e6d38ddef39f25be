"""Ray shell around :class:`cacovid_rl.rl.worker.RewardWorker`: placement, weight sync, liveness.

The actor pulls a newer weight version (one zero-copy object-store read, checksum verified) only
between work items, never mid-question, and echoes the version in every result. After loading it hashes
the weights its policy now holds and reports that checksum (``info`` and every status): a received buffer
proves nothing about what the policy rolls out with (a load that silently does nothing keeps the old
weights under the new version number).

Every status and ``info()`` carry an :class:`~cacovid_rl.rl.worker.ActorReport`, what the actor measures of itself
(device readings, cumulative counters, sync latencies), built in one place (:meth:`RewardActor.report`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import Any

import ray

from actors.weights import WeightHandle, state_checksum
from cacovid_rl.config import from_dict
from cacovid_rl.device_stats import DeviceMonitor
from cacovid_rl.rl.worker import ActorReport, RewardWorker, RolloutStatus, WorkItem

log = logging.getLogger(__name__)


class RewardActor:
    # ``prefetch`` hints run in their own thread: in the default group (one call at a time) a hint would wait behind
    # the very ``run`` it is meant to overlap. Pass to ``ray.remote(concurrency_groups=...)``; ``run`` stays serial.
    CONCURRENCY_GROUPS = {"prefetch": 1}

    def __init__(self, cfg_dict: dict[str, Any], actor_id: str) -> None:
        worker = RewardWorker(from_dict(cfg_dict), actor_id=actor_id)
        self._attach(worker, worker.adapter.device)

    def _attach(self, worker: RewardWorker, device: Any) -> None:
        """The actor's state around ``worker`` (benchmarks attach a worker that holds only a policy)."""
        self.worker = worker
        self.sync_latency_s = 0.0
        self.sync_load_s = 0.0
        self.syncs = 0
        self.weights_checksum = state_checksum(self.worker.policy)
        # The LLM stays loaded for the actor's life, so the peaks include it: they are what meets the device's limit.
        self.monitor = DeviceMonitor(device)
        self.totals = {"items": 0, "combos": 0, "video_tokens": 0, "kept_tokens": 0}

    def report(self, synced: bool = False, device: dict[str, Any] | None = None) -> ActorReport:
        """This actor's :class:`ActorReport` now (``device``: readings already taken; default a look that does not
        start a new ``cpu_util`` window, as ``info`` wants)."""
        return ActorReport(
            # Outside Ray (a test driving the actor class in-process) there is no node, and asking would start Ray.
            node_id=ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
            pid=os.getpid(),
            actor_started=self.worker.started,
            version=self.worker.version,
            weights_checksum=self.weights_checksum,
            busy_s=self.worker.busy_s,
            alive_s=time.time() - self.worker.started,
            synced=synced,
            sync_latency_s=self.sync_latency_s,
            sync_load_s=self.sync_load_s,
            totals=dict(self.totals),
            device=self.monitor.info() if device is None else device,
        )

    def info(self) -> ActorReport:
        return self.report()

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
    def run(self, item: WorkItem, handle: WeightHandle) -> tuple[RolloutStatus, bytes]:
        synced_before = self.syncs
        self.sync(handle)
        status, payload = self.worker.run(item)
        if status.ok:
            self.totals["items"] += 1
            self.totals["combos"] += status.combos
            self.totals["video_tokens"] += status.video_tokens
            self.totals["kept_tokens"] += status.kept_tokens
        report = self.report(synced=self.syncs > synced_before, device=self.monitor.stats())
        return replace(status, actor=report), payload

    def prefetch(self, item: WorkItem) -> bool:
        """Hint: ``item`` is queued behind the running call; start decoding its video (``cacovid_rl.rl.prefetch``).

        Call as ``handle.prefetch.options(concurrency_group="prefetch", num_returns=0).remote(item)``: returns at
        once, and a lost hint (dead actor, cache full) only means ``run`` decodes the item itself.
        """
        return self.worker.prefetch(item)
