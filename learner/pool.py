"""Elastic pool of reward actors: one dispatch helper, growth as nodes arrive, shrink as they leave.

Each actor asks for ``cluster.actor_resource`` (``reward_actor`` on a cluster), so on an autoscaling
cluster a pool larger than the cluster leaves actors pending and the autoscaler adds nodes
(``request_resources`` makes that demand explicit up to ``max_actors``). Actors are only given work
once they report where they run; an actor whose node has left is killed and its work re-dispatched.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

from actors.reward_actor import RewardActor
from actors.weights import WeightHandle
from cacovid_rl.config import Config
from cacovid_rl.rl.worker import WorkItem

log = logging.getLogger(__name__)


@dataclass
class Slot:
    actor_id: str
    handle: Any
    info_ref: Any
    node_id: str = ""  # the node it last reported from (its ``info``); kept while it restarts
    up: bool = False  # answered ``info`` since it started or last failed: only then does it get work
    inflight: dict[Any, float] = field(default_factory=dict)  # status ref -> dispatch time, in dispatch order


class ActorPool:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.cfg_dict = cfg.to_dict()
        self.slots: dict[str, Slot] = {}
        self._next = 0
        self.created = 0
        self.removed = 0
        self._last_resize = 0.0
        self._remote = ray.remote(concurrency_groups=RewardActor.CONCURRENCY_GROUPS)(RewardActor)
        self._autoscaler_error = ""  # the last request_resources failure logged (logged once, not every resize)

    # -- membership ----------------------------------------------------------------------------
    def capacity(self) -> int:
        """How many actors the live nodes can host by the pool's custom resource."""
        res = self.cfg.cluster.actor_resource
        if not res:
            return self.cfg.cluster.max_actors
        total = sum(n["Resources"].get(res, 0.0) for n in ray.nodes() if n["Alive"])
        return int(total)

    def target_size(self) -> int:
        c = self.cfg.cluster
        return max(c.min_actors, min(c.max_actors, self.capacity()))

    def _spawn(self) -> None:
        c = self.cfg.cluster
        actor_id = f"reward-{self._next}"
        self._next += 1
        opts: dict[str, Any] = {
            "num_cpus": c.actor_num_cpus,
            "num_gpus": c.actor_num_gpus,
            "max_restarts": c.max_restarts,
            "max_task_retries": 0,  # the driver re-dispatches; Ray must not silently re-run work
            # Named so operators (and the fault-injection tests) can find an actor: ray.get_actor(name).
            "name": f"cacovid-{os.getpid()}-{actor_id}",
        }
        if c.actor_resource:
            opts["resources"] = {c.actor_resource: 1}
        handle = self._remote.options(**opts).remote(self.cfg_dict, actor_id)
        self.slots[actor_id] = Slot(actor_id, handle, handle.info.remote())
        self.created += 1

    def remove(self, actor_id: str) -> list[Any]:
        """Kill an actor for good; returns its in-flight status refs (for re-dispatch)."""
        slot = self.slots.pop(actor_id)
        ray.kill(slot.handle, no_restart=True)
        self.removed += 1
        return list(slot.inflight)

    def resize(self, force: bool = False) -> list[Any]:
        """Grow/shrink towards the target size; returns in-flight refs of removed actors."""
        now = time.monotonic()
        if not force and now - self._last_resize < self.cfg.cluster.pool_resize_every_s:
            self._poll_ready()
            return []
        self._last_resize = now
        self._poll_ready()
        orphaned: list[Any] = []
        alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for slot in list(self.slots.values()):
            if slot.node_id and slot.node_id not in alive_nodes:  # also while it restarts (not ready)
                log.warning("node of %s left the cluster: removing it", slot.actor_id)
                orphaned += self.remove(slot.actor_id)
        target = self.target_size()
        while len(self.slots) < target:
            self._spawn()
        if len(self.slots) > target:  # shrink: drop idle actors first
            for slot in sorted(self.slots.values(), key=lambda s: (len(s.inflight), not s.up)):
                if len(self.slots) <= target:
                    break
                if not slot.inflight:
                    orphaned += self.remove(slot.actor_id)
        if self.cfg.cluster.address != "local" and self.cfg.cluster.actor_resource:
            self._request_autoscaler_capacity()
        return orphaned

    def _request_autoscaler_capacity(self) -> None:
        """Ask the autoscaler for ``max_actors`` slots of the actor resource (a standing request, so repeating
        it each resize is harmless). On a static cluster the request is recorded and nothing launches; a request
        that fails is a misconfiguration or an autoscaler fault that would stall the pool below its size, so it
        is logged as a warning (once per distinct error: resize runs every few seconds) and training goes on."""
        from ray.autoscaler.sdk import request_resources

        try:
            request_resources(bundles=[{self.cfg.cluster.actor_resource: 1}] * self.cfg.cluster.max_actors)
        except Exception as exc:  # the pool keeps working at its current size
            message = f"{type(exc).__name__}: {exc}"
            if message != self._autoscaler_error:
                log.warning("request_resources for %d reward actors failed: %s", self.cfg.cluster.max_actors, message)
                self._autoscaler_error = message
        else:
            self._autoscaler_error = ""

    def _poll_ready(self) -> None:
        pending = {s.info_ref: s for s in self.slots.values() if not s.up}
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            slot = pending[ref]
            try:
                slot.node_id = ray.get(ref, timeout=1).node_id
                slot.up = True
            except ActorDiedError as exc:  # out of restarts (or killed for good): replace it
                log.warning("actor %s died for good, replacing it: %s", slot.actor_id, exc)
                self.slots.pop(slot.actor_id, None)
                self.removed += 1
            except (RayActorError, GetTimeoutError) as exc:
                log.warning("actor %s is not up yet: %s", slot.actor_id, exc)
                slot.info_ref = slot.handle.info.remote()

    def mark_failed(self, slot: Slot) -> None:
        """A call to this actor failed: take it out of dispatch until it answers ``info`` again.

        Ray restarts a crashed actor (``max_restarts``), maybe on another node; until then every call to it fails
        at once, so dispatching to it would only burn the re-dispatch queue. The fresh ``info`` also records the
        node the restarted actor landed on (the node-loss check uses it). An actor that is out of restarts answers
        ``ActorDiedError`` and ``_poll_ready`` replaces it."""
        if slot.actor_id in self.slots and slot.up:
            slot.up = False
            slot.info_ref = slot.handle.info.remote()

    def wait_ready(self, n: int, timeout: float) -> None:
        """Block until at least ``n`` actors report ready (start-up)."""
        deadline = time.monotonic() + timeout
        while self.ready_count() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {self.ready_count()} of {n} reward actors started in {timeout:.0f}s; "
                    "check cluster resources (cluster.actor_num_gpus / actor_resource) and actor logs"
                )
            self._poll_ready()
            time.sleep(0.05)

    def ready_count(self) -> int:
        """Actors that get work (answered ``info``)."""
        return sum(s.up for s in self.slots.values())

    # -- dispatch ------------------------------------------------------------------------------
    def free_slots(self) -> list[Slot]:
        cap = self.cfg.cluster.inflight_per_actor
        return sorted((s for s in self.slots.values() if s.up and len(s.inflight) < cap), key=lambda s: len(s.inflight))

    def submit(self, slot: Slot, item: WorkItem, handle: WeightHandle, prefetch: bool = True) -> tuple[Any, Any, bool]:
        """Queue ``item`` on ``slot``; returns (status ref, payload ref, whether its decode was hinted).

        ``prefetch=False`` (an item that already failed once) keeps its decode inside its own ``run`` call, so a crash
        there is attributed to it alone."""
        hinted = bool(prefetch and self.cfg.cluster.prefetch and slot.inflight)
        if hinted:
            # The item queues behind a running one: let the actor decode its video meanwhile. Fire and forget
            # (no return value to fetch): the driver tracks the item by its ``run`` call alone.
            slot.handle.prefetch.options(concurrency_group="prefetch", num_returns=0).remote(item)
        status_ref, payload_ref = slot.handle.run.remote(item, handle)
        slot.inflight[status_ref] = time.monotonic()
        return status_ref, payload_ref, hinted

    def owner(self, status_ref: Any) -> Slot | None:
        for s in self.slots.values():
            if status_ref in s.inflight:
                return s
        return None

    def hung(self) -> list[Slot]:
        limit = self.cfg.cluster.call_timeout_s
        now = time.monotonic()
        return [s for s in self.slots.values() if any(now - t > limit for t in s.inflight.values())]

    def restart(self, slot: Slot) -> list[Any]:
        """Kill a hung actor and let Ray restart it (``max_restarts``); returns its in-flight refs."""
        refs = list(slot.inflight)
        slot.inflight.clear()
        ray.kill(slot.handle, no_restart=False)
        slot.up = False
        slot.info_ref = slot.handle.info.remote()
        return refs

    def shutdown(self) -> None:
        for actor_id in list(self.slots):
            self.remove(actor_id)
