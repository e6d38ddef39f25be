"""Says, with the missing resources, when reward actors wait for placement (a pending actor is otherwise silent)."""

from __future__ import annotations

import logging
import time

import ray

from cacovid_rl.config import Config
from learner.pool import ActorPool

log = logging.getLogger("cacovid_rl.driver")


class PlacementWatch:
    """Says, with the missing resources, when reward actors wait for placement.

    Logged after ``grace_s`` of waiting and again only when the number waiting changes (or every ``repeat_s``).
    """

    def __init__(self, cfg: Config, grace_s: float = 20.0, repeat_s: float = 300.0) -> None:
        c = cfg.cluster
        self.cfg = cfg
        self.need = {
            "CPU": c.actor_num_cpus,
            "GPU": c.actor_num_gpus,
            **({c.actor_resource: 1.0} if c.actor_resource else {}),
        }
        self.need = {k: v for k, v in self.need.items() if v > 0}
        self.grace_s, self.repeat_s = grace_s, repeat_s
        self.waiting_since: dict[str, float] = {}
        self.last: tuple[int, float] = (0, 0.0)

    def check(self, pool: ActorPool, force: bool = False) -> None:
        now = time.monotonic()
        if force:
            self._static_check(pool)
            return
        waiting = [s.actor_id for s in pool.slots.values() if not s.up]
        self.waiting_since = {a: self.waiting_since.get(a, now) for a in waiting}
        late = [a for a, t in self.waiting_since.items() if now - t >= self.grace_s]
        if not late:
            self.last = (0, self.last[1])
            return
        if len(late) == self.last[0] and now - self.last[1] < self.repeat_s:
            return
        self.last = (len(late), now)
        try:
            total, free = ray.cluster_resources(), ray.available_resources()
        except Exception:  # a cluster query failing must not stop training
            total, free = {}, {}
        short = {k: v for k, v in self.need.items() if free.get(k, 0.0) < v}
        log.warning(
            "%d of %d reward actors not placed after %.0fs (%s): each needs %s; the cluster has %s in total, %s free%s",
            len(late),
            len(pool.slots),
            self.grace_s,
            ", ".join(late),
            _fmt(self.need),
            _fmt({k: total.get(k, 0.0) for k in self.need}),
            _fmt({k: free.get(k, 0.0) for k in self.need}),
            f"; missing {_fmt(short)}" if short else " (they may still be starting)",
        )

    def wait_first_actor(self, pool: ActorPool, timeout_s: float) -> None:
        """Block until one actor is ready (start-up), saying meanwhile why actors wait; ``TimeoutError`` after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while pool.ready_count() == 0:
            self.check(pool)
            try:
                pool.wait_ready(1, timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise

    def _static_check(self, pool: ActorPool) -> None:
        """A local instance's size is known: say up front when not every actor can ever be placed."""
        c = self.cfg.cluster
        if c.address != "local" or c.actor_num_cpus <= 0:
            return
        fits = int(c.num_cpus // c.actor_num_cpus)
        if fits < len(pool.slots):
            log.warning(
                "only %d of %d reward actors fit on the local Ray instance (cluster.num_cpus=%d, "
                "cluster.actor_num_cpus=%g): the pool runs with %d; raise cluster.num_cpus or lower cluster.max_actors",
                fits,
                len(pool.slots),
                c.num_cpus,
                c.actor_num_cpus,
                fits,
            )


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
