"""The bounded-staleness schedule without Ray: window, duplicates, re-dispatch, lost payloads, strikes, quarantine.

Every expected value is worked out by hand from the rules in ``learner/staleness.py``'s docstring; calls are plain
strings standing in for Ray object refs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cacovid_rl.data.records import QARecord
from cacovid_rl.rl.worker import RolloutStatus, WorkItem
from learner.metrics import StageTimer
from learner.staleness import Counters, DataCursor, StalenessSchedule


def _records(n: int) -> list[QARecord]:
    return [
        QARecord(
            sample_id=f"s{i}",
            problem="Which box ?",
            answer="A",
            solution="<answer>A</answer>",
            problem_type="multiple choice",
            video=Path(f"/videos/{i}.mp4"),
            options=("A. red", "B. blue"),
            data_source="test",
        )
        for i in range(n)
    ]


def _schedule(
    n_records: int = 8, qps: int = 2, lag: int = 1, strikes: int = 2, version: int = 0, end: int = 10, **counters
) -> StalenessSchedule:
    return StalenessSchedule(
        DataCursor(_records(n_records), seed=3),
        questions_per_step=qps,
        max_staleness=lag,
        max_item_failures=strikes,
        version=version,
        end=end,
        counters=Counters(**counters),
    )


def _ok(item: WorkItem) -> RolloutStatus:
    return RolloutStatus(item.index, item.batch_index, item.sample_id, "reward-0", 0, "ok")


def _drain(s: StalenessSchedule) -> list[WorkItem]:
    out = []
    while (item := s.next_item()) is not None:
        out.append(item)
    return out


def _run(s: StalenessSchedule, item: WorkItem, call: str, payload: str = "") -> None:
    """Dispatch ``item`` as ``call`` and finish it with an ok status."""
    s.dispatched(call, item, payload or f"p-{call}", hinted=False)
    got, ref = s.finished(call)
    assert s.record(got, _ok(got), ref)


def test_cursor_is_a_seeded_permutation_per_epoch() -> None:
    recs = _records(5)
    cursor = DataCursor(recs, seed=11)
    epoch0 = [cursor.item(g, 0).sample_id for g in range(5)]
    epoch1 = [cursor.item(g, 0).sample_id for g in range(5, 10)]
    want0 = [f"s{i}" for i in np.random.default_rng([11, 0]).permutation(5)]
    want1 = [f"s{i}" for i in np.random.default_rng([11, 1]).permutation(5)]
    assert epoch0 == want0 and epoch1 == want1
    assert [cursor.item(g, 0).epoch for g in (0, 4, 5, 9)] == [0, 0, 1, 1]
    third = int(np.random.default_rng([11, 1]).permutation(5)[2])  # index 7 = epoch 1, position 2
    assert cursor.item(7, 3) == WorkItem(7, 3, 1, WorkItem.record_to_dict(recs[third]))
    with pytest.raises(ValueError, match=r"data\.train_path"):
        DataCursor([], seed=0)


def test_an_item_beyond_the_window_waits_until_the_learner_catches_up() -> None:
    s = _schedule(qps=2, lag=1)
    s.open_window()
    # Version 0, L = 1: batches 0 and 1 (questions 0..3) may run; batch 2 waits.
    items = _drain(s)
    assert [(i.index, i.batch_index) for i in items] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert [s.weight_version(i) for i in items] == [0, 0, 0, 0]  # batch 1 runs with max(0, 1 - 1)
    s.open_window()
    assert s.next_item() is None
    for k, item in enumerate(items):
        _run(s, item, f"c{k}")
    statuses, payloads = s.complete_batch()
    assert [st.index for st in statuses] == [0, 1] and payloads == ["p-c0", "p-c1"]
    s.consumed(1)
    s.open_window()
    nxt = _drain(s)
    assert [(i.index, i.batch_index) for i in nxt] == [(4, 2), (5, 2)]
    assert s.weight_version(nxt[0]) == 1


def test_the_window_stops_at_the_end_of_the_run() -> None:
    s = _schedule(qps=2, lag=3, end=2)
    s.open_window()
    assert [i.index for i in _drain(s)] == [0, 1, 2, 3]  # batches 0, 1 only, though L = 3 allows 4


def test_a_duplicate_result_is_counted_once_and_kept_once() -> None:
    s = _schedule()
    s.open_window()
    item = s.next_item()
    s.dispatched("first", item, "p1", hinted=False)
    s.dispatched("second", item, "p2", hinted=False)  # re-dispatched while the first try still ran
    got, ref = s.finished("first")
    assert s.record(got, _ok(got), ref)
    got, ref = s.finished("second")
    assert not s.record(got, _ok(got), ref)
    assert s.counters.duplicates == 1
    assert s.results[0][item.index].payload == "p1"
    assert s.counters.dispatched == 2


def test_a_result_for_a_consumed_batch_is_a_duplicate() -> None:
    s = _schedule(qps=1, lag=1)
    s.open_window()
    a, b = s.next_item(), s.next_item()
    _run(s, a, "a")
    s.complete_batch()
    s.consumed(1)
    assert not s.record(a, _ok(a), "late")
    assert s.counters.duplicates == 1 and s.counters.consumed_indices == [0]
    assert s.record(b, _ok(b), "pb")


def test_skipped_results_complete_a_batch_but_do_not_train() -> None:
    s = _schedule(qps=2)
    s.open_window()
    a, b = s.next_item(), s.next_item()
    _run(s, a, "a")
    assert s.complete_batch() is None  # one of two
    bad = RolloutStatus(b.index, b.batch_index, b.sample_id, "reward-1", 0, "skipped", reason="bad_video")
    assert s.record(b, bad, "pb")
    statuses, payloads = s.complete_batch()
    assert [st.index for st in statuses] == [a.index] and payloads == ["p-a"]
    assert s.counters.skipped == 1 and s.counters.skip_reasons == {"bad_video": 1}
    s.consumed(1)
    assert s.counters.consumed == 2 and s.counters.consumed_indices == [0, 1]


def test_a_lost_payload_reruns_its_question_in_the_same_batch() -> None:
    s = _schedule(qps=3, lag=0)
    s.open_window()
    items = _drain(s)
    skipped = RolloutStatus(1, 0, items[1].sample_id, "r", 0, "skipped", reason="bad_video")
    _run(s, items[0], "a")
    s.record(items[1], skipped, None)
    _run(s, items[2], "c")
    statuses, _ = s.complete_batch()
    assert [st.index for st in statuses] == [0, 2]
    assert s.lost([1]) == 1  # position 1 of the update's list is data index 2 (index 1 was skipped)
    assert s.counters.lost_payloads == 1 and s.counters.redispatched == 1
    assert s.complete_batch() is None and sorted(s.results[0]) == [0, 1]
    again = s.next_item()
    assert (again.index, again.batch_index, again.epoch) == (2, 0, 0) and again == items[2]
    _run(s, again, "c2")
    assert s.complete_batch()[1] == ["p-a", "p-c2"]


def test_requeue_puts_lost_calls_first_and_ignores_finished_ones() -> None:
    s = _schedule(qps=4, lag=0)
    s.open_window()
    a, b = s.next_item(), s.next_item()
    s.dispatched("ca", a, "pa", hinted=False)
    s.dispatched("cb", b, "pb", hinted=False)
    s.finished("ca")  # finished before its actor was removed
    s.requeue(["ca", "cb"])
    assert s.counters.redispatched == 1
    assert [i.index for i in _drain(s)] == [1, 2, 3]
    assert s.pending() == []


def test_strikes_quarantine_an_item_and_its_record_in_later_epochs(caplog) -> None:
    # 2 records, 1 question a batch: question 2 is record (epoch 1) of question 0 or 1.
    s = _schedule(n_records=2, qps=1, lag=0, strikes=3, end=4)
    s.open_window()
    item = s.next_item()
    for k in range(2):
        s.dispatched(f"t{k}", item, None, hinted=False)
        s.timed_out([f"t{k}"], "no answer")
        assert s.strikes[item.index] == k + 1
        assert s.next_item() == item  # re-dispatched, first in line
    assert s.may_prefetch(item) is False
    s.dispatched("t2", item, None, hinted=False)
    with caplog.at_level(logging.ERROR, logger="cacovid_rl.driver"):
        s.timed_out(["t2"], "no answer")  # the third strike
    assert "quarantined sample" in caplog.text
    assert s.counters.quarantined == 1 and s.counters.quarantined_ids == [item.sample_id]
    assert s.counters.redispatched == 2 and s.counters.skip_reasons == {"quarantined": 1}
    statuses, payloads = s.complete_batch()  # the quarantined item completes its batch, untrained
    assert statuses == [] and payloads == []
    assert s.results[0][item.index].status.reason == "quarantined"
    s.consumed(1)
    # Epoch 1: the same record comes round again at one of indices 2, 3 and is skipped without a call.
    dispatched = []
    for v in (1, 2, 3):
        s.open_window()
        while (nxt := s.next_item()) is not None:
            dispatched.append(nxt.sample_id)
            _run(s, nxt, f"e{nxt.index}")
        s.complete_batch()
        s.consumed(v + 1)
    assert item.sample_id not in dispatched and len(dispatched) == 2
    assert s.counters.skip_reasons == {"quarantined": 2} and s.counters.consumed_indices == [0, 1, 2, 3]


def test_quarantine_survives_a_resume_through_the_counters() -> None:
    s = _schedule(n_records=2, qps=2, lag=0, quarantined_ids=["s0", "s1"])
    s.open_window()
    assert s.next_item() is None
    assert s.counters.skip_reasons == {"quarantined": 2}
    assert [r.status.reason for r in s.results[0].values()] == ["quarantined", "quarantined"]


def test_a_dead_actor_blames_its_running_call_and_hinted_queued_ones() -> None:
    s = _schedule(qps=4, lag=0, strikes=5)
    s.open_window()
    running, hinted, plain = s.next_item(), s.next_item(), s.next_item()
    s.dispatched("run", running, None, hinted=False)
    s.dispatched("hint", hinted, None, hinted=True)
    s.dispatched("plain", plain, None, hinted=False)
    s.blame("run", ["hint", "plain"])
    for call, item in (("run", running), ("hint", hinted), ("plain", plain)):
        s.finished(call)
        s.failed(call, item, "RayActorError: died", raised=False)
    assert dict(s.strikes) == {running.index: 1, hinted.index: 1}  # the plain queued call is not at fault
    assert s.counters.redispatched == 3
    # A call that raised inside the actor is its item's fault even when nothing blamed it.
    s.dispatched("raise", plain, None, hinted=False)
    s.finished("raise")
    s.failed("raise", plain, "RayTaskError: boom", raised=True)
    assert s.strikes[plain.index] == 1


def test_stage_timer_sums_per_stage_until_taken() -> None:
    ticks = iter([0.0, 1.0, 1.0, 3.5, 10.0, 10.25])
    timer = StageTimer(clock=lambda: next(ticks))
    with timer("dispatch"):
        pass
    with timer("dispatch"):
        pass
    assert timer.take() == {"timing/dispatch": 1.0 + 2.5}
    with timer("update"):
        pass
    assert timer.take() == {"timing/update": 0.25}
    assert timer.take() == {}
