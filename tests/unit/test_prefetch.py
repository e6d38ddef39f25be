"""Reward-actor prefetch (issue 18 #1): the cache is bounded, loses nothing and never changes a result."""

from __future__ import annotations

import dataclasses
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
        value, prefetched = p.take("a", lambda: calls.append("inline") or -1)
        assert (value, prefetched, calls) == (41, True, ["bg"])
        assert len(p) == 0  # taken entries leave the cache
        # Never hinted: loaded inline, same contract.
        assert p.take("b", lambda: 7) == (7, False)
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
        assert p.take(0, lambda: -1) == (0, True)
        assert p.take(1, lambda: -1) == (1, True)
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
        assert p.take("y", lambda: "inline") == ("next", True)
    finally:
        p.close()


def test_stale_entries_and_late_hints_do_not_pin_memory() -> None:
    p = Prefetcher(capacity=2)
    try:
        p.hint("old", lambda: "o")
        p.hint("cur", lambda: "c")
        assert p.take("cur", lambda: None) == ("c", True)
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
        value, prefetched = p.take("next", lambda: "inline")
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
    assert p.take(1, lambda: "inline") == ("inline", False)


# -- the reward worker with and without prefetch ---------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from cacovid_rl.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("clips")
    make_synthetic(out, n=8, seed=5)
    return out


def _worker(prefetch: bool, encode: bool = False, *extra: str):
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
            f"cluster.prefetch_encode={str(encode).lower()}",
            *extra,
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
    ready, prefetched = on.prefetcher.take((item.index, item.epoch), lambda: None)
    assert prefetched and ready.encoded is None  # decode only: cluster.prefetch_encode is off by default
    np.testing.assert_array_equal(ready.frames, on.decode(item.to_record()))


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


# -- cluster.prefetch_encode: the encode on the prefetch thread too ---------------------------------------------


def test_prefetch_encode_needs_prefetch() -> None:
    from cacovid_rl.config import ConfigError

    with pytest.raises(ConfigError, match=r"cluster\.prefetch_encode.*cluster\.prefetch=true"):
        load_config(None, ["cluster.prefetch=false", "cluster.prefetch_encode=true"])
    assert load_config(None, ["cluster.prefetch_encode=true"]).cluster.prefetch_encode
    assert not load_config(None, []).cluster.prefetch_encode  # off unless asked: it costs device memory


@pytest.fixture
def encoder(workers):
    """A worker with ``cluster.prefetch_encode`` whose ``adapter.encode`` records the thread and grad mode of each
    call; the module's prefetch-off worker is returned beside it as the reference."""
    import torch

    worker = _worker(True, True)
    calls: list[tuple[str, str, bool]] = []
    real = worker.adapter.encode

    def encode(frames, prompt):
        calls.append((prompt, threading.current_thread().name, torch.is_grad_enabled()))
        return real(frames, prompt)

    worker.adapter.encode = encode
    yield worker, workers[1], calls
    worker.prefetcher.close()


def test_prefetch_encode_gives_the_same_trajectories_and_encodes_in_the_background(encoder, clips: Path) -> None:
    from cacovid_rl.data.prompts import build_prompt

    enc, off, calls = encoder
    items = _items(clips)
    hinted = []
    for cur, nxt in zip(items, [*items[1:], None], strict=True):
        if nxt is not None:
            assert enc.prefetch(nxt)
        hinted.append(enc.run(cur))
    reference = [off.run(it) for it in items]
    assert [s.prefetched for s, _ in hinted] == [False, True, True]
    for (s1, b1), (s2, b2) in zip(hinted, reference, strict=True):
        assert s1.status == s2.status == "ok"
        assert _content(b1) == _content(b2)  # byte-identical to the run without any prefetch
    prompts = [build_prompt(it.to_record().problem, it.to_record().problem_type) for it in items]
    # The first item (never hinted) is encoded inside its run; the hinted two on the prefetch thread (the first of
    # them while the first item runs, so in either order with it), and every encode with grad off (a fresh thread
    # starts with it on).
    assert sorted(calls) == sorted(
        [
            (prompts[0], threading.current_thread().name, False),
            (prompts[1], "cacovid-prefetch", False),
            (prompts[2], "cacovid-prefetch", False),
        ]
    )
    for status, _ in hinted:  # the background encode's time is still reported, and inside the total
        t = status.timings
        assert t["encode"] > 0 and t["total"] >= t["encode"] + t["policy"] + t["score"]
    assert len(enc.prefetcher) == 0


def test_a_failed_background_encode_is_the_items_normal_skip(encoder, clips: Path, monkeypatch) -> None:
    enc, off, calls = encoder
    items = [dataclasses.replace(it, epoch=1) for it in _items(clips)]
    bad_prompt = items[1].to_record().problem
    for worker in (enc, off):
        real = worker.adapter.encode

        def rejecting(frames, prompt, real=real):
            if bad_prompt in prompt:
                raise ValueError("the encoder rejects these frames")
            return real(frames, prompt)

        monkeypatch.setattr(worker.adapter, "encode", rejecting)
    assert enc.prefetch(items[1])
    status, payload = enc.run(items[1])
    assert (status.status, status.reason, payload) == ("skipped", "bad_record", b"")
    assert status.error == "ValueError: the encoder rejects these frames"
    ref = off.run(items[1])[0]  # the same failure without prefetch: the same skip
    assert (ref.status, ref.reason, ref.error) == (status.status, status.reason, status.error)
    # The thread survived: the next hinted item is encoded there and rolled out.
    assert enc.prefetch(items[2])
    status, payload = enc.run(items[2])
    assert status.ok and status.prefetched and _content(payload) == _content(off.run(items[2])[1])
    assert [name for _, name, _ in calls] == ["cacovid-prefetch"]  # the wrapped encode, before the rejecting one


def test_prefetch_encode_keeps_the_cache_bounded(encoder, clips: Path) -> None:
    enc, off, _ = encoder
    items = [dataclasses.replace(it, epoch=2) for it in _items(clips)]
    capacity = enc.cfg.cluster.inflight_per_actor
    assert capacity == 2 < len(items)
    assert [enc.prefetch(it) for it in items] == [True] * capacity + [False] * (len(items) - capacity)
    assert len(enc.prefetcher) <= capacity
    runs = [enc.run(it) for it in items]
    assert [s.prefetched for s, _ in runs] == [True] * capacity + [False] * (len(items) - capacity)
    assert [_content(b) for _, b in runs] == [_content(off.run(it)[1]) for it in items]
    assert len(enc.prefetcher) == 0


def test_prefetch_encode_never_tokenizes_a_prompt_over_budget(clips: Path) -> None:
    """The prompt cap guards the actor against huge questions; the background encode must not bypass it."""
    from cacovid_rl.rl.worker import WorkItem

    worker = _worker(True, True, "model.max_prompt_tokens=4")
    try:
        encodes: list[str] = []
        real = worker.adapter.encode
        worker.adapter.encode = lambda frames, prompt: encodes.append(prompt) or real(frames, prompt)
        item = _items(clips)[0]
        long = WorkItem(7, 0, 0, dict(item.record, problem=" ".join(["word"] * 50)))
        assert worker.prefetch(long)
        # Let the background load finish first: a run that came first would drop the entry before it was loaded.
        assert worker.prefetcher._entries[(long.index, long.epoch)].done.wait(5)
        status, payload = worker.run(long)
        assert (status.status, status.reason, payload) == ("skipped", "prompt_too_long", b"")
        assert encodes == [] and len(worker.prefetcher) == 0
    finally:
        worker.prefetcher.close()


def test_prefetch_encode_on_qwen_gives_the_same_trajectories(tmp_path: Path, clips: Path) -> None:
    """Qwen2.5-VL's encode writes shared model state (it resets ``model.model.rope_deltas``) on the prefetch thread
    while the scoring thread generates with the same model; generation passes explicit positions, so the
    trajectories must not change."""
    from cacovid_rl.models.tiny import save_tiny_qwen2_5_vl
    from cacovid_rl.rl.worker import RewardWorker

    ckpt = save_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0)
    overrides = [
        f"model.path={ckpt}",
        "model.family=qwen2_5_vl",
        "data.num_frames=4",
        "sampling.num_content=1",
        "sampling.num_token=2",
        "sampling.num_frame=1",
        "rollout.iterations=1",
    ]
    enc = RewardWorker(load_config(None, [*overrides, "cluster.prefetch_encode=true"]))
    off = RewardWorker(load_config(None, [*overrides, "cluster.prefetch=false"]))
    try:
        items = _items(clips)
        runs = []
        for cur, nxt in zip(items, [*items[1:], None], strict=True):
            if nxt is not None:
                assert enc.prefetch(nxt)
            runs.append(enc.run(cur))
        assert [(s.status, s.prefetched) for s, _ in runs] == [("ok", False), ("ok", True), ("ok", True)]
        assert [_content(b) for _, b in runs] == [_content(off.run(it)[1]) for it in items]
    finally:
        enc.prefetcher.close()
