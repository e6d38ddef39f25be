"""Reward-actor prefetch (issue 18 #1): the cache is bounded, loses nothing and never changes a result."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cacovid_rl.config import load_config
from cacovid_rl.data.records import load_records
from cacovid_rl.rl.prefetch import Prefetcher

# -- the Ray-free prefetcher ------------------------------------------------------------------------------------


def _wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_a_hinted_item_is_loaded_in_the_background_and_taken_once() -> None:
    calls: list[str] = []
    p = Prefetcher(capacity=2)
    try:
        assert p.hint("a", lambda: calls.append("bg") or 41)
        _wait_for(lambda: calls == ["bg"])  # loaded before anyone asked
        value, prefetched, _ = p.take("a", lambda: calls.append("inline") or -1)
        assert (value, prefetched, calls) == (41, True, ["bg"])
        assert len(p) == 0  # taken entries leave the cache
        # Never hinted: loaded inline, same contract.
        assert p.take("b", lambda: 7)[:2] == (7, False)
    finally:
        p.close()


def test_the_cache_never_holds_more_than_its_bound() -> None:
    release = threading.Event()
    p = Prefetcher(capacity=2)
    try:
        assert p.hint(0, lambda: release.wait() and 0)  # blocks the thread: later hints pile up
        assert p.hint(1, lambda: 1)
        for k in range(2, 10):
            assert not p.hint(k, lambda k=k: k)
            assert len(p) <= 2
        assert p.stats["dropped"] == 8
        release.set()
        assert p.take(0, lambda: -1)[:2] == (0, True)
        assert p.take(1, lambda: -1)[:2] == (1, True)
        assert len(p) == 0
    finally:
        release.set()
        p.close()


def test_a_background_failure_is_the_items_own_exception() -> None:
    p = Prefetcher(capacity=1)
    try:

        def bad() -> None:
            raise OSError("corrupt video")

        p.hint("x", bad)
        with pytest.raises(OSError, match="corrupt video"):
            p.take("x", lambda: "never")
        assert p.hint("y", lambda: "next")  # the thread survived the failure
        assert p.take("y", lambda: "inline")[:2] == ("next", True)
    finally:
        p.close()


def test_stale_entries_and_late_hints_do_not_pin_memory() -> None:
    p = Prefetcher(capacity=2)
    try:
        p.hint("old", lambda: "o")
        p.hint("cur", lambda: "c")
        assert p.take("cur", lambda: None)[:2] == ("c", True)
        assert len(p) == 0  # "old" was hinted before "cur": its run already happened elsewhere in the queue
        assert not p.hint("cur", lambda: "c")  # a hint trailing its own run is ignored
        p.discard("skipped")  # a run that ended without taking (prompt over budget) ...
        assert not p.hint("skipped", lambda: "s")  # ... is never loaded afterwards
    finally:
        p.close()


def test_a_take_never_waits_behind_another_items_stuck_load() -> None:
    """The thread is stuck on one item's load (a video that hangs decord); a later item hinted behind it is loaded
    inline by its own take, so its run does not inherit the hang (and the hang stays the stuck item's own)."""
    release, started = threading.Event(), threading.Event()
    p = Prefetcher(capacity=2)
    try:
        assert p.hint("stuck", lambda: started.set() or (release.wait(30) and "late"))
        assert started.wait(5)  # the thread is inside the stuck load
        assert p.hint("next", lambda: "from the thread")
        t0 = time.monotonic()
        value, prefetched, _ = p.take("next", lambda: "inline")
        assert (value, prefetched) == ("inline", False)
        assert time.monotonic() - t0 < 5.0
    finally:
        release.set()
        p.close()


def test_close_never_leaves_a_take_hanging() -> None:
    release = threading.Event()
    p = Prefetcher(capacity=2)
    p.hint(0, lambda: release.wait(5) and 0)
    p.hint(1, lambda: "bg")  # queued behind the blocked load
    closer = threading.Thread(target=p.close)
    closer.start()
    release.set()
    closer.join(5)
    assert p.take(1, lambda: "inline")[:2] == ("inline", False)


# -- the reward worker with and without prefetch ---------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from cacovid_rl.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("clips")
    make_synthetic(out, n=8, seed=5)
    return out


def _worker(prefetch: bool):
    from cacovid_rl.rl.worker import RewardWorker

    cfg = load_config(
        None,
        [
            "model.path=tiny",
            "data.num_frames=4",
            "sampling.num_content=1",
            "sampling.num_token=2",
            "sampling.num_frame=1",
            "rollout.iterations=1",
            f"cluster.prefetch={str(prefetch).lower()}",
        ],
    )
    return RewardWorker(cfg)


@pytest.fixture(scope="module")
def workers():
    on, off = _worker(True), _worker(False)
    yield on, off
    on.prefetcher.close()


def _items(clips: Path):
    from cacovid_rl.rl.worker import WorkItem

    recs = load_records(clips / "train.json", clips).records[:3]
    return [WorkItem(i, 0, 0, WorkItem.record_to_dict(r)) for i, r in enumerate(recs)]


def _content(payload: bytes) -> bytes:
    """The encoded trajectory without its wall-clock timings (the one field that differs between any two runs)."""
    import dataclasses

    from cacovid_rl.rl.trajectory import Trajectory

    return dataclasses.replace(Trajectory.from_bytes(payload), timings={}).to_bytes()


def test_prefetched_frames_equal_a_fresh_decode(workers, clips: Path) -> None:
    on, _ = workers
    item = _items(clips)[0]
    assert on.prefetch(item)
    frames, prefetched, _ = on.prefetcher.take((item.index, item.epoch), lambda: None)
    assert prefetched
    np.testing.assert_array_equal(frames, on.decode(item.to_record()))


def test_a_redispatched_item_gives_the_same_trajectory_with_and_without_prefetch(workers, clips: Path) -> None:
    on, off = workers
    items = _items(clips)
    # Prefetch the next item while the current runs, as the driver's hint does; then the same items again
    # (a re-dispatch), this time without a hint; and on a worker with prefetch off.
    hinted = []
    for cur, nxt in zip(items, [*items[1:], None], strict=True):
        if nxt is not None:
            assert on.prefetch(nxt)
        hinted.append(on.run(cur))
    plain = [on.run(it) for it in items]
    off_runs = [off.run(it) for it in items]
    assert [s.prefetched for s, _ in hinted] == [False, True, True]
    assert not any(s.prefetched for s, _ in plain + off_runs)
    for (s1, b1), (s2, b2), (s3, b3) in zip(hinted, plain, off_runs, strict=True):
        assert s1.status == s2.status == s3.status == "ok"
        assert _content(b1) == _content(b2) == _content(b3)  # byte-identical trajectories
    assert len(on.prefetcher) == 0


def test_a_failed_background_decode_is_the_items_normal_skip(workers, clips: Path) -> None:
    from cacovid_rl.rl.worker import WorkItem

    on, _ = workers
    item = _items(clips)[0]
    record = dict(item.record, video=str(clips / "no-such-video.mp4"))
    bad = WorkItem(99, 0, 0, record)
    assert on.prefetch(bad)
    status, payload = on.run(bad)
    assert status.status == "skipped" and status.reason == "bad_video" and payload == b""
    assert "does not exist" in status.error
    assert on.run(item)[0].status == "ok"  # the actor goes on
