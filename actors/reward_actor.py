"""Ray shell around :class:`cacovid_rl.rl.worker.RewardWorker`: placement, weight sync, liveness.

The actor pulls a newer weight version (one zero-copy object-store read, checksum verified) only
between work items, never mid-question, and echoes the version in every result. After loading it hashes
the weights its policy now holds and reports that checksum (``info`` and every status): a received buffer
proves nothing about what the policy rolls out with (a load that silently does nothing keeps the old
weights under the new version number).

Every status and ``info()`` also carry what the actor measures of itself (wandb's system monitor runs on the driver,
on a cluster's GPU-less head node): ``device`` (``cacovid_rl.device_stats``: peak allocated/reserved GPU memory or
RSS, GPU and CPU utilisation), the item's ``video_tokens`` and ``kept_tokens``, and ``totals``, cumulative counters
(items, combinations, tokens) from which ``learner/monitoring.py`` computes exact cluster-wide rates; ``pid`` and
``actor_started`` tell a restarted actor (same id, counters back at 0) apart.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray

from cacovid_rl.config import from_dict
from cacovid_rl.device_stats import DeviceMonitor
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.rl.worker import RewardWorker, WorkItem
from learner.weights import WeightHandle, state_checksum

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

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "version": self.worker.version,
            "weights_checksum": self.weights_checksum,
            "actor_started": self.worker.started,
            "busy_s": self.worker.busy_s,
            "totals": dict(self.totals),
            "device": self.monitor.info(),
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
        if status.get("status") == "ok":
            video, kept = token_counts(payload)
            status["video_tokens"], status["kept_tokens"] = video, kept
            self.totals["items"] += 1
            self.totals["combos"] += int(status["combos"])
            self.totals["video_tokens"] += video
            self.totals["kept_tokens"] += kept
        status["totals"] = dict(self.totals)
        status["device"] = self.monitor.stats()
        status["pid"] = os.getpid()
        status["actor_started"] = self.worker.started
        return status, payload

    def prefetch(self, item: dict[str, Any]) -> bool:
        """Hint: ``item`` is queued behind the running call; start decoding its video (``cacovid_rl.rl.prefetch``).

        Call as ``handle.prefetch.options(concurrency_group="prefetch", num_returns=0).remote(item)``: returns at
        once, and a lost hint (dead actor, cache full) only means ``run`` decodes the item itself.
        """
        return self.worker.prefetch(WorkItem(**item))

    def hang(self, seconds: float) -> None:
        """Test hook: block this actor (simulates a hung GPU kernel)."""
        time.sleep(seconds)


def token_counts(payload: bytes) -> tuple[int, int]:
    """(video tokens of the question, kept tokens summed over its combinations) of an encoded trajectory.

    Read back from the payload because the worker's status does not carry them. msgpack copies the arrays once:
    55-70 ms for a 46 MB payload (6,400 x 3,584 float16 embeddings, a 7B model's 16 frames) on a shared 2-core CPU,
    against the seconds a 7B rollout of one question takes. Moving the counts into the worker's status would save it.
    """
    try:
        traj = Trajectory.from_bytes(payload)
        return int(traj.num_frames) * int(traj.tokens_per_frame), int(traj.keep_lengths.sum())
    except Exception as exc:  # counting must never cost the item: the learner decodes (and judges) it again
        log.warning("token counts of a trajectory unavailable: %s", exc)
        return 0, 0
