"""Loader for Video-R1 JSON: both schemas, bad records counted with index + field, malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cacovid_rl.data.records import DataError, QARecord, extract_answer, load_records, save_records


@pytest.fixture()
def video_root(tmp_path: Path) -> Path:
    root = tmp_path / "videos"
    root.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (root / name).write_bytes(b"\x00")  # existence is all the loader checks
    return root


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_cacovid_schema(tmp_path: Path, video_root: Path) -> None:
    raw = [
        {
            "problem": "What colour is the cube?\nOptions:\nA. red\nB. blue",
            "solution": "<answer>B</answer>",
            "problem_type": "multiple choice",
            "modality_type": "video",
            "video": "a.mp4",
        }
    ]
    report = load_records(_write(tmp_path / "d.json", raw), video_root)
    assert report.errors == [] and not report.skipped
    (rec,) = report.records
    assert rec.answer == "B" and rec.solution == "<answer>B</answer>"
    assert rec.problem == raw[0]["problem"]  # options already in the problem: not appended again
    assert rec.video == video_root / "a.mp4" and rec.video.is_absolute()
    assert rec.sample_id == "0"


def test_upstream_schema_appends_options(tmp_path: Path, video_root: Path) -> None:
    raw = [
        {
            "problem_id": 17,
            "problem": "How many cars?",
            "data_type": "video",
            "problem_type": "numerical",
            "options": [],
            "solution": "<answer>3</answer>",
            "path": "./b.mp4",
            "data_source": "CLEVRER",
        },
        {
            "problem_id": 18,
            "problem": "Which one?",
            "data_type": "video",
            "problem_type": "multiple choice",
            "options": ["A. left", "B. right"],
            "solution": "<answer>A</answer>",
            "path": "a.mp4",
            "data_source": "LLaVA-Video",
        },
    ]
    report = load_records(_write(tmp_path / "d.json", raw), video_root)
    assert [r.sample_id for r in report.records] == ["17", "18"]
    assert report.records[0].answer == "3" and report.records[0].data_source == "CLEVRER"
    assert report.records[1].problem == "Which one?\nOptions:\nA. left\nB. right"
    assert report.records[1].options == ("A. left", "B. right")


def test_bad_records_are_counted_with_index_and_field(tmp_path: Path, video_root: Path) -> None:
    good = {"problem": "q", "solution": "<answer>A</answer>", "problem_type": "multiple choice", "video": "a.mp4"}
    raw = [
        good,
        {**good, "modality_type": "image"},
        {**good, "problem_type": "essay"},
        {**good, "video": "missing.mp4"},
        {k: v for k, v in good.items() if k != "solution"},
        "not an object",
        {**good, "problem": ["a", "list"]},
    ]
    report = load_records(_write(tmp_path / "d.json", raw), video_root)
    assert len(report.records) == 1
    assert report.skipped == {
        "not_video": 1,
        "unknown_problem_type": 1,
        "missing_video": 1,
        "missing_field": 1,
        "invalid_record": 1,
        "invalid_field": 1,
    }
    expected = [
        ("record 1", "modality_type"),
        ("record 2", "problem_type"),
        ("record 3", "missing.mp4"),
        ("record 4", "solution"),
        ("record 5", "JSON object"),
        ("record 6", "problem"),
    ]
    for msg, (index, fld) in zip(report.errors, expected, strict=True):
        assert f"{index}:" in msg and fld in msg
    assert "6 skipped" in report.summary()


def test_missing_videos_not_checked_when_asked(tmp_path: Path, video_root: Path) -> None:
    raw = [{"problem": "q", "solution": "7", "problem_type": "numerical", "video": "nowhere.mp4"}]
    report = load_records(_write(tmp_path / "d.json", raw), video_root, check_videos=False)
    assert report.records[0].answer == "7"  # no tags: the raw solution is the answer


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "broken.json"
    p.write_text('[\n  {"problem": "q",\n   "solution" "x"}\n]')
    with pytest.raises(DataError, match=r"broken\.json.*line 3, column 15"):
        load_records(p)
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(DataError, match="JSON list"):
        load_records(_write(tmp_path / "obj.json", {"problem": "q"}))


def test_save_then_load_round_trip(tmp_path: Path, video_root: Path) -> None:
    recs = [
        QARecord("s1", "What? Options:\nA. x", "A", "<answer>A</answer>", "multiple choice", video_root / "a.mp4"),
        QARecord("s2", "How many?", "2", "<answer>2</answer>", "numerical", video_root / "b.mp4", (), "src"),
    ]
    out = save_records(recs, tmp_path / "out" / "f.json", video_root=video_root)
    saved = json.loads(out.read_text())
    assert saved[0]["video"] == "a.mp4" and saved[0]["modality_type"] == "video"
    assert load_records(out, video_root).records == recs


def test_extract_answer() -> None:
    """The reward's own parser (cacovid_rl.answers): the first block stripped, else the text unchanged."""
    assert extract_answer("<think>x</think><answer> C </answer>") == "C"
    assert extract_answer(" 3.5 ") == " 3.5 "
