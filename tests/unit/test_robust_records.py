"""Poison records end as counted skips (issue 14): at load, in a reward worker, in an evaluation; placement logs.

Each test reproduces one failure of the issue's probes: a lone surrogate in a question (valid JSON) raised a
TypeError from the tokenizer that nothing caught, one non-UTF-8 byte rejected a whole file, a video path could leave
``data.video_root``, a 100,000-character question ran an actor out of memory, one bad record killed an evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cacovid_rl.config import load_config
from cacovid_rl.data.records import load_records, record_to_dict


def _rec(video: str, problem: str = "What colour is the box ?", **extra) -> dict:
    return {
        "problem": problem,
        "solution": "<answer>A</answer>",
        "problem_type": "multiple choice",
        "video": video,
        **extra,
    }


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "videos"
    r.mkdir()
    (r / "a.mp4").write_bytes(b"\x00")
    return r


def test_non_utf8_byte_costs_its_record_not_the_file(tmp_path: Path, root: Path) -> None:
    good = json.dumps(_rec("a.mp4")).encode()
    bad = json.dumps(_rec("a.mp4", problem="What colour XX box ?")).encode().replace(b"XX", b"\xff")
    path = tmp_path / "d.json"
    path.write_bytes(b"[" + good + b"," + bad + b"]")
    report = load_records(path, root)  # was: UnicodeDecodeError naming nothing, for the whole file
    assert len(report.records) == 1 and report.skipped == {"invalid_text": 1}
    assert "record 1" in report.errors[0] and "'problem'" in report.errors[0]


def test_lone_surrogate_escape_is_skipped_at_load(tmp_path: Path, root: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"problem": "What colour \\udcff box ?", "solution": "<answer>A</answer>", '
                    '"problem_type": "multiple choice", "video": "a.mp4"}]')  # fmt: skip
    report = load_records(path, root)
    assert report.records == [] and report.skipped == {"invalid_text": 1}


def test_video_paths_stay_inside_the_root_and_skips_do_not_reveal_existence(tmp_path: Path, root: Path) -> None:
    recs = [_rec("../" * 16 + "etc/passwd"), _rec("/etc/passwd"), _rec("/etc/no-such-file"), _rec("a.mp4")]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    report = load_records(path, root)
    assert len(report.records) == 1 and report.skipped == {"video_outside_root": 3}
    # The message for an existing outside file and a missing one is the same text (after the record index).
    assert report.errors[1].split(":", 2)[2] == report.errors[2].split(":", 2)[2]
    assert "passwd" not in " ".join(report.errors)
    allowed = load_records(path, root, allow_outside_root=True)
    assert len(allowed.records) == 3 and allowed.skipped == {"missing_video": 1}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from cacovid_rl.rl.worker import RewardWorker

    cfg = load_config(None, ["model.path=tiny", "model.max_prompt_tokens=512", "sampling.num_token=2"])
    return RewardWorker(cfg)


def _item(record: dict, index: int = 0):
    from cacovid_rl.rl.worker import WorkItem

    return WorkItem(index=index, batch_index=0, epoch=0, record={"problem_id": f"p{index}", **record})


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from cacovid_rl.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("clips")
    make_synthetic(out, n=4, seed=5)
    return out


def test_worker_turns_any_item_exception_into_a_skip(worker, clips: Path) -> None:
    # The record bypasses the loader (as a re-dispatched item's dict does) and its video decodes. Before the fix the
    # tokenizer's TypeError on the lone surrogate escaped ``run`` and the item was re-dispatched forever; now the
    # worker's own parse names the field (tests/ray/test_poison_records.py injects a raw TypeError as well).
    video = str(load_records(clips / "train.json", clips).records[0].video)
    status, payload = worker.run(_item(_rec(video, problem="What colour \udcff box ?")))
    assert status.status == "skipped" and payload == b""
    assert status.reason == "bad_record" and "'problem' is not valid UTF-8" in status.error, status


def test_worker_skips_a_prompt_over_the_token_budget_without_decoding(worker, tmp_path: Path) -> None:
    status, _ = worker.run(_item(_rec(str(tmp_path / "missing.mp4"), problem="x " * 50_000)))
    assert status.status == "skipped" and status.reason == "prompt_too_long", status
    assert "model.max_prompt_tokens=512" in status.error


def test_one_bad_record_never_kills_an_evaluation(worker, clips: Path) -> None:
    from cacovid_rl.data.records import QARecord
    from cacovid_rl.eval.evaluate import evaluate

    good = load_records(clips / "train.json", clips).records[0]
    poison = QARecord(**{**good.__dict__, "sample_id": "poison", "problem": "What colour \udcff box ?"})
    result = evaluate(worker.adapter, None, [poison, good], (0.5,), ("uniform",), num_frames=4, max_new_tokens=2)
    assert result["n"] == 1 and result["skipped"] == 1 and result["errors"][0].startswith("poison:")


def test_evaluation_drops_over_budget_prompts_before_the_model_sees_them(worker, monkeypatch) -> None:
    from actors.evaluation import _within_prompt_budget
    from cacovid_rl.data.records import QARecord

    long = QARecord("long", "x " * 50_000, "A", "<answer>A</answer>", "multiple choice", Path("/v.mp4"))
    short = QARecord("short", "What colour ?", "A", "<answer>A</answer>", "multiple choice", Path("/v.mp4"))
    kept, dropped = _within_prompt_budget(worker.adapter, [long, short], 512)
    assert kept == [short] and dropped[0].startswith("long:") and "max_prompt_tokens" in dropped[0]


def test_work_item_round_trip_keeps_absolute_paths_inside_root(root: Path) -> None:
    rec = load_records_single(root)
    from cacovid_rl.rl.worker import WorkItem

    item = WorkItem(0, 0, 0, record_to_dict(rec))
    assert item.to_record().video == rec.video  # the actor's own parse must not treat its path as outside


def load_records_single(root: Path):
    path = root.parent / "one.json"
    path.write_text(json.dumps([_rec("a.mp4")]))
    return load_records(path, root).records[0]


def test_unplaceable_actors_are_logged_with_the_missing_resources(caplog) -> None:
    from learner.placement import PlacementWatch

    cfg = load_config(None, ["cluster.min_actors=4", "cluster.max_actors=4", "cluster.num_cpus=2"])
    slots = {f"reward-{i}": type("S", (), {"actor_id": f"reward-{i}", "up": i < 2})() for i in range(4)}
    pool = type("P", (), {"slots": slots})()
    watch = PlacementWatch(cfg, grace_s=0.0)
    with caplog.at_level(logging.WARNING, logger="cacovid_rl.driver"):
        watch.check(pool, force=True)
    assert "only 2 of 4 reward actors fit" in caplog.text and "cluster.num_cpus=2" in caplog.text
