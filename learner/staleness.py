"""The bounded-staleness schedule: which question runs with which weight version, and what each batch has.

Ray-free bookkeeping behind the driver (``learner/driver.py`` does the Ray calls and tells this class what
happened), so every rule below is unit-tested without a cluster (``tests/unit/test_staleness.py``):

- **Window.** The data is an endless, seeded sequence of questions (:class:`DataCursor`) cut into learner batches
  of ``questions_per_step``. Batch ``b`` is rolled out with weight version ``max(0, b - L)`` (``L`` =
  ``max_staleness``) and the learner consumes batches strictly in order, so update ``b`` produces version ``b + 1``.
  Questions of batches up to ``version + L`` may be dispatched; later ones wait until the learner catches up.
- **Idempotency.** Results are keyed by the global question index: a second result for an index (a re-dispatched
  question whose first try also finished) is dropped and counted as a duplicate, so consumed indices are exactly
  the dispatched ones.
- **Re-dispatch.** A call lost with its actor (dead, removed, restarted) puts its item back at the front of the
  queue; a trajectory lost with its node after the rollout makes the question run again in the same batch.
- **Poison records.** A call that hangs, kills its actor or raises in it is a strike against the item it was
  running (and against queued items whose video the actor was decoding ahead). After ``max_item_failures`` strikes
  the item is quarantined: a ``skipped`` result in its batch, and its record is skipped in later epochs, so no
  record can stall training.

Calls are opaque, hashable keys (Ray object refs in the driver; anything in a test).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cacovid_rl.data.records import QARecord
from cacovid_rl.rl.worker import RolloutStatus, WorkItem

log = logging.getLogger("cacovid_rl.driver")


class DataCursor:
    """Global question index -> (epoch, record): a fresh seeded permutation per epoch."""

    def __init__(self, records: Sequence[QARecord], seed: int) -> None:
        if not records:
            raise ValueError("no usable training records: check data.train_path and data.video_root")
        self.records = records
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def item(self, index: int, batch_index: int) -> WorkItem:
        n = len(self.records)
        epoch = index // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
        rec = self.records[int(self._perms[epoch][index % n])]
        return WorkItem(index, batch_index, epoch, WorkItem.record_to_dict(rec))


@dataclass
class Counters:
    """The run's data accounting (logged as ``data/*``, saved in every checkpoint, summed over resumes)."""

    dispatched: int = 0
    redispatched: int = 0
    consumed: int = 0
    skipped: int = 0
    duplicates: int = 0
    actor_failures: int = 0
    hung_restarts: int = 0
    lost_payloads: int = 0
    quarantined: int = 0
    checkpoint_failures: int = 0
    eval_failures: int = 0
    consumed_indices: list[int] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    """Items skipped during training, by reason (``bad_video``, ``prompt_too_long``, ``quarantined``, ...)."""
    load_skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped when the training file was loaded, by reason."""
    quarantined_ids: list[str] = field(default_factory=list)
    """Sample ids of the quarantined items (the operator's list of records to look at)."""

    def count_skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1

    def as_metrics(self) -> dict[str, float]:
        out = {f"data/{k}": float(v) for k, v in self.__dict__.items() if isinstance(v, (int, float))}
        out.update({f"data/skipped/{k}": float(v) for k, v in self.skip_reasons.items()})
        out.update({f"data/load_skipped/{k}": float(v) for k, v in self.load_skipped.items()})
        return out


@dataclass(frozen=True)
class Result:
    """A question's result in its batch: the status and the (opaque) trajectory reference; ``None`` when skipped
    without a call (quarantined)."""

    status: RolloutStatus
    payload: Any


class StalenessSchedule:
    """The window, the per-batch results, re-dispatch, duplicates, lost payloads and poison-record strikes."""

    def __init__(
        self,
        cursor: DataCursor,
        *,
        questions_per_step: int,
        max_staleness: int,
        max_item_failures: int,
        version: int,
        end: int,
        counters: Counters,
    ) -> None:
        self.cursor = cursor
        self.qps = questions_per_step
        self.lag = max_staleness
        self.max_item_failures = max_item_failures
        self.version = version
        """The learner's current version: the next batch to update on."""
        self.end = end
        """The version the run stops at (no batch at or beyond it is opened)."""
        self.counters = counters
        self.next_batch = version
        self.queue: deque[WorkItem] = deque()
        self.results: dict[int, dict[int, Result]] = {}
        self.strikes: Counter[int] = Counter()
        """Data index -> hangs, actor deaths and raised calls while it ran."""
        # Sample ids: a later epoch's copy of a quarantined record is skipped without a try.
        self.quarantine: set[str] = set(counters.quarantined_ids)
        self._inflight: dict[Hashable, tuple[WorkItem, Any]] = {}  # call -> (item, payload reference)
        self._hinted: set[Hashable] = set()  # calls whose video the actor was told to decode ahead
        self._blamed: set[Hashable] = set()  # calls that were running (or decoding ahead) when their actor died
        self._update_indices: list[int] = []  # data indices of the payloads the pending update was given, in order

    # -- window and dispatch ----------------------------------------------------------------------------------------
    def open_window(self) -> None:
        """Queue every question of the batches that may be rolled out now (up to ``version + L``)."""
        while self.next_batch < self.end and self.next_batch <= self.version + self.lag:
            b = self.next_batch
            self.queue.extend(self.cursor.item(g, b) for g in range(b * self.qps, (b + 1) * self.qps))
            self.next_batch += 1

    def weight_version(self, item: WorkItem) -> int:
        """The version ``item``'s batch is rolled out with (the same for every try, so a retry is identical)."""
        return max(0, item.batch_index - self.lag)

    def next_item(self) -> WorkItem | None:
        """The next question to dispatch (None: nothing waits); quarantined records are recorded as skipped."""
        while self.queue:
            item = self.queue.popleft()
            if item.index in self.results.get(item.batch_index, {}):
                continue  # quarantined while it waited
            if item.sample_id in self.quarantine:
                self._skip_quarantined(item, "quarantined earlier in this run")
                continue
            return item
        return None

    def may_prefetch(self, item: WorkItem) -> bool:
        """False for an item that already failed once: its decode stays inside its own call, so a crash there is
        attributed to it alone."""
        return self.strikes[item.index] == 0

    def dispatched(self, call: Hashable, item: WorkItem, payload: Any, hinted: bool) -> None:
        self._inflight[call] = (item, payload)
        if hinted:
            self._hinted.add(call)
        self.counters.dispatched += 1

    # -- calls in flight --------------------------------------------------------------------------------------------
    def pending(self) -> list[Hashable]:
        return list(self._inflight)

    def is_pending(self, call: Hashable) -> bool:
        return call in self._inflight

    def finished(self, call: Hashable) -> tuple[WorkItem, Any]:
        """Take ``call`` out of flight: its (item, payload reference)."""
        self._hinted.discard(call)
        return self._inflight.pop(call)

    def requeue(self, calls: Iterable[Hashable]) -> None:
        """Calls lost through no fault of their item (actor removed or restarted): run their items again, first."""
        for call in calls:
            if call in self._inflight:
                item, _ = self.finished(call)
                self._redispatch(item)

    def timed_out(self, calls: Sequence[Hashable], why: str) -> None:
        """A hung actor's calls, in dispatch order: the first was running (a strike), the rest were queued."""
        if calls and calls[0] in self._inflight:
            item, _ = self.finished(calls[0])
            self.strike(item, why)
        self.requeue(calls[1:])

    def blame(self, running: Hashable, queued: Iterable[Hashable]) -> None:
        """An actor died while running ``running``: blame it, and the ``queued`` calls whose videos it was decoding
        ahead (a crash in the decoder is theirs as much). Queued calls that were not hinted are not at fault."""
        self._blamed.add(running)
        self._blamed.update(c for c in queued if c in self._hinted)

    def failed(self, call: Hashable, item: WorkItem, why: str, raised: bool) -> None:
        """``call`` (already :meth:`finished`) failed; ``raised``: the actor raised (the item's fault)."""
        if raised or call in self._blamed:
            self._blamed.discard(call)
            self.strike(item, why)
        else:
            self._redispatch(item)

    def strike(self, item: WorkItem, why: str) -> None:
        """Count a failure against ``item``; re-dispatch it, or quarantine it at ``max_item_failures``."""
        self.strikes[item.index] += 1
        if self.strikes[item.index] < self.max_item_failures:
            self._redispatch(item)
            return
        log.error(
            "quarantined sample %s (data index %d) after %d failed calls (last: %s): skipped from now on",
            item.sample_id,
            item.index,
            self.strikes[item.index],
            why,
        )
        self.counters.quarantined += 1
        self.counters.quarantined_ids.append(item.sample_id)
        self.quarantine.add(item.sample_id)
        self._skip_quarantined(item, why)

    # -- results ----------------------------------------------------------------------------------------------------
    def record(self, item: WorkItem, status: RolloutStatus, payload: Any) -> bool:
        """Keep a finished call's result; False (counted) for a duplicate or a result of a batch already consumed."""
        if item.batch_index < self.version or item.index in self.results.get(item.batch_index, {}):
            self.counters.duplicates += 1
            return False
        self.results.setdefault(item.batch_index, {})[item.index] = Result(status, payload)
        if not status.ok:
            self.counters.count_skip(status.reason or "skipped")
        return True

    def complete_batch(self) -> tuple[list[RolloutStatus], list[Any]] | None:
        """The current batch's rolled-out questions (statuses, payloads; by data index) once every question of it
        has a result, else None. Skipped questions are left out; the positions are remembered for :meth:`lost`."""
        batch = self.results.get(self.version, {})
        if len(batch) != self.qps:
            return None
        self._update_indices = [g for g in sorted(batch) if batch[g].status.ok]
        oks = [batch[g] for g in self._update_indices]
        return [r.status for r in oks], [r.payload for r in oks]

    def lost(self, positions: Iterable[int]) -> int:
        """The update found these payloads (positions in :meth:`complete_batch`'s lists) gone with their node: their
        questions run again, first. Returns how many."""
        n = 0
        for pos in positions:
            g = self._update_indices[pos]
            del self.results[self.version][g]
            self.queue.appendleft(self.cursor.item(g, self.version))
            self.counters.lost_payloads += 1
            self.counters.redispatched += 1
            n += 1
        return n

    def consumed(self, new_version: int) -> None:
        """The learner updated on the current batch and is now at ``new_version``."""
        batch = self.results.pop(self.version)
        self.counters.consumed += len(batch)
        self.counters.consumed_indices.extend(sorted(batch))
        self.version = new_version

    # -- internals --------------------------------------------------------------------------------------------------
    def _redispatch(self, item: WorkItem) -> None:
        self.queue.appendleft(item)
        self.counters.redispatched += 1

    def _skip_quarantined(self, item: WorkItem, why: str) -> None:
        """Record ``item`` as a skipped result of its batch (once; never for a batch already consumed)."""
        if item.batch_index < self.version or item.index in self.results.get(item.batch_index, {}):
            return
        self.counters.count_skip("quarantined")
        self.results.setdefault(item.batch_index, {})[item.index] = Result(RolloutStatus.quarantined(item, why), None)
