"""A bounded, thread-fed look-ahead cache: the next item's decode runs while the current one is scored.

Decoding a question's video inside the call that then scores it would leave the actor's device idle while decord
reads the frames. The driver already queues ``cluster.inflight_per_actor`` items per actor, so when it hands
an actor a second item it also sends a *hint*; :class:`Prefetcher` decodes hinted items on one background thread and
``take`` hands the frames to ``run``. With ``cluster.prefetch_encode`` the load also encodes the question (the vision
tower and the prompt embedding, ``rl.rollout.encode_question``), so ``run`` starts at the policy's scoring.

Why this keeps the reward path's guarantees:

- **Same trajectory.** Decoding is deterministic and the cache is keyed by the item (its index and epoch), so frames
  from the cache are the frames ``run`` would have decoded itself; the rollout's RNG depends on the sample only. The
  encode reads only those frames and the frozen LLM (never the policy, whose weights a sync may change meanwhile),
  under ``no_grad`` like the inline one (grad mode is per thread): the same question ``run`` would have encoded.
- **Nothing is lost.** The cache is only an optimisation held in the actor's memory: the driver still tracks every
  item as in flight and re-dispatches it if the actor dies; ``take`` of a key never hinted (or dropped) decodes
  inline.
- **Bounded memory.** At most ``capacity`` items are queued, being decoded or decoded-and-waiting; hints past that
  are dropped (counted), and ``take`` discards entries hinted before the taken one (their run already happened:
  a Ray actor runs one caller's calls in order).
- **Failures stay the item's.** An exception of the background load is stored and re-raised by ``take``, inside
  ``run``'s own ``try``, so a bad video (or a question the encoder rejects) is the item's normal ``skipped`` status,
  never a dead thread or actor.

Ray-free: the Ray shell (``actors/reward_actor.py``) only forwards hints.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Entry:
    """One hinted item: its loader, then its result (value or exception) once ``done`` is set."""

    seq: int
    load: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None
    cancelled: bool = False  # never loaded (closed or dropped first): ``take`` loads it inline


class Prefetcher:
    """Load hinted items on one daemon thread into a cache of at most ``capacity`` entries.

    ``hint(key, load)`` schedules ``load()`` (non-blocking); ``take(key, load)`` returns the cached result, waits for
    one being loaded, or calls ``load()`` inline when the key was never hinted. One thread because the loads compete
    with scoring for the actor's CPUs: one decode ahead is what hides the decode, more would only slow scoring.
    """

    def __init__(self, capacity: int = 1, recent: int = 64) -> None:
        if capacity < 1:
            raise ValueError(f"prefetch capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: dict[Hashable, _Entry] = {}
        self._todo: collections.deque[Hashable] = collections.deque()
        # Keys already run: a hint that arrives after its item ran (hints travel in their own Ray concurrency group,
        # so they can overtake or trail the run) must not decode it again and hold the memory until evicted.
        self._recent: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self._recent_cap = recent
        self._seq = 0
        self._current: Hashable | None = None  # the key the thread is loading now
        self._cv = threading.Condition()
        self._closed = False
        self.stats = {"hinted": 0, "dropped": 0, "hits": 0, "waited": 0, "misses": 0, "discarded": 0}
        self._thread = threading.Thread(target=self._loop, name="cacovid-prefetch", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._cv:
            return len(self._entries)

    def hint(self, key: Hashable, load: Callable[[], Any]) -> bool:
        """Schedule ``load()`` for ``key``; False (and nothing scheduled) if full, closed, known or already run."""
        with self._cv:
            if self._closed or key in self._entries or key in self._recent:
                return False
            if len(self._entries) >= self.capacity:
                self.stats["dropped"] += 1
                return False
            self._seq += 1
            self._entries[key] = _Entry(self._seq, load)
            self._todo.append(key)
            self.stats["hinted"] += 1
            self._cv.notify_all()
            return True

    def take(self, key: Hashable, load: Callable[[], Any]) -> tuple[Any, bool]:
        """(result, prefetched?) for ``key``; re-raises the load's exception (the result carries its own timings).

        ``prefetched`` is True when the result came from (or was being produced by) the background thread.
        """
        with self._cv:
            self._mark_run(key)
            entry = self._entries.get(key)
            if entry is not None and key in self._todo and self._current is not None:
                # Not started because the thread is busy with another item's load (which may never end, e.g. a
                # video that hangs decord). Waiting would tie this item's fate to that one: load it here instead.
                self._drop(key)
                entry = None
            if entry is not None:
                # Entries hinted before this one belong to items that already ran (or never will here): drop them.
                for k in [k for k, e in self._entries.items() if e.seq < entry.seq]:
                    self._drop(k)
                if entry.done.is_set():
                    self.stats["hits"] += 1
                else:
                    self.stats["waited"] += 1
            else:
                self.stats["misses"] += 1
        if entry is not None:
            entry.done.wait()
            with self._cv:
                self._entries.pop(key, None)
        if entry is None or entry.cancelled:
            return load(), False
        if entry.error is not None:
            raise entry.error
        return entry.value, True

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` (its run ended without taking it, e.g. a prompt over budget) and never load it again."""
        with self._cv:
            self._mark_run(key)
            if key in self._entries:
                self._drop(key)

    def close(self) -> None:
        """Stop the thread after the load in progress (if any); later hints are refused."""
        with self._cv:
            self._closed = True
            for key in self._todo:  # never loaded: a ``take`` waiting on one must not hang
                entry = self._entries[key]
                entry.cancelled = True
                entry.done.set()
            self._todo.clear()
            self._cv.notify_all()
        self._thread.join(timeout=5)

    # -- internals (called with the lock held, except _loop) -------------------------------------------------
    def _mark_run(self, key: Hashable) -> None:
        self._recent[key] = None
        self._recent.move_to_end(key)
        while len(self._recent) > self._recent_cap:
            self._recent.popitem(last=False)

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        if key in self._todo:
            self._todo.remove(key)
            entry.cancelled = True
            entry.done.set()  # nobody waits on a dropped entry, but keep the invariant: every entry ends done
        self.stats["discarded"] += 1

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._todo and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                key = self._todo.popleft()
                entry = self._entries[key]
                self._current = key
            try:
                entry.value = entry.load()
            except BaseException as exc:  # the item's own failure: ``take`` re-raises it inside ``run``'s try
                entry.error = exc
            with self._cv:
                self._current = None
            entry.done.set()
