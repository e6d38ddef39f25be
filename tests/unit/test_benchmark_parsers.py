"""Benchmark files in their lmms-eval layouts (Video-MME, MLVU, LongVideoBench) -> QARecords.

The small files written here follow the public layouts (lmms-eval task YAMLs and utils.py): field names,
option formats, answer encodings and video locations. Videos are empty placeholder files: the parsers
only resolve paths.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from cacovid_rl.eval import benchmarks as B


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


VIDEOMME_ROWS = [
    {
        "video_id": "001",
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "url": "https://www.youtube.com/watch?v=fFjv93ACGo8",
        "videoID": "fFjv93ACGo8",
        "question_id": "001-1",
        "task_type": "Counting Problem",
        "question": "When demonstrating the Germany modern Christmas tree is initially decorated with apples, "
        "candles and berries, which kind of the decoration has the largest number?",
        "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
        "answer": "C",
    },
    {
        "video_id": "002",
        "duration": "long",
        "domain": "Sports Competition",
        "sub_category": "Football",
        "url": "",
        "videoID": "MissingVid",
        "question_id": "002-1",
        "task_type": "Action Recognition",
        "question": "What happens first?",
        "options": ["A. A goal.", "B. A foul.", "C. A corner.", "D. A throw-in."],
        "answer": "B",
    },
]


def test_videomme_json_layout(tmp_path: Path) -> None:
    _touch(tmp_path / "data" / "fFjv93ACGo8.mp4")
    path = tmp_path / "videomme.json"
    path.write_text(json.dumps(VIDEOMME_ROWS))
    report, layout = B.load_benchmark(path)
    assert layout == "videomme"
    assert len(report.records) == 1 and report.skipped == {"missing_video": 1}
    assert "MissingVid" in report.errors[0] and "videoID" in report.errors[0]
    rec = report.records[0]
    assert rec.sample_id == "001-1" and rec.answer == "C" and rec.solution == "<answer>C</answer>"
    assert rec.problem_type == "multiple choice" and rec.data_source == "videomme/short"
    assert rec.video == (tmp_path / "data" / "fFjv93ACGo8.mp4").absolute()
    assert rec.options == (
        "A. Apples.",
        "B. Candles.",
        "C. Berries.",
        "D. The three kinds are of the same number.",
    )
    assert rec.problem.startswith("When demonstrating") and rec.problem.endswith(
        "Options:\nA. Apples.\nB. Candles.\nC. Berries.\nD. The three kinds are of the same number."
    )


def test_videomme_parquet_layout_and_mkv(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _touch(tmp_path / "data" / "fFjv93ACGo8.mkv")
    (tmp_path / "videomme").mkdir()
    path = tmp_path / "videomme" / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(VIDEOMME_ROWS[:1]), path)
    report, layout = B.load_benchmark(path, video_root=tmp_path)
    assert layout == "videomme" and len(report.records) == 1
    assert report.records[0].video.name == "fFjv93ACGo8.mkv"
    assert report.records[0].answer == "C"


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(B.BenchmarkError, match=r"needs pyarrow.*cacovid-rl\[report\]"):
        B.read_rows(path)


MLVU_DEV_ROWS = [
    {
        "video_name": "movie101_66.mp4",
        "duration": 246.0,
        "question": "What color is the main male character in the video?\n(A) Yellow\n(B) Red\n(C) Green\n(D) Blue",
        "candidates": ["Yellow", "Red", "Green", "Blue"],
        "answer": "(A)",
        "task_type": "plotQA",
        "question_id": "plotQA_0",
    },
    {
        "video_name": "needle_32.mp4",
        "duration": 467.0,
        "question": "What does the hand coming out of the computer do?\n(A) Delivers a product\n(B) Shakes hands",
        "answer": "B",
        "task_type": "needle",
        "question_id": "needle_0",
    },
]


def test_mlvu_lmms_eval_layout_inline_options(tmp_path: Path) -> None:
    _touch(tmp_path / "video" / "1_plotQA" / "movie101_66.mp4")  # MLVU groups videos per task
    _touch(tmp_path / "needle_32.mp4")
    path = tmp_path / "mlvu_dev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MLVU_DEV_ROWS) + "\n\n")
    report, layout = B.load_benchmark(path)
    assert layout == "mlvu" and report.skipped == {}
    a, b = report.records
    assert a.sample_id == "plotQA_0" and a.answer == "A" and a.data_source == "mlvu/plotQA"
    assert a.problem == (
        "What color is the main male character in the video?\nOptions:\nA. Yellow\nB. Red\nC. Green\nD. Blue"
    )
    assert a.video == (tmp_path / "video" / "1_plotQA" / "movie101_66.mp4").absolute()
    assert b.answer == "B" and b.options == ("A. Delivers a product", "B. Shakes hands")


def test_mlvu_original_json_answer_text(tmp_path: Path) -> None:
    rows = [
        {
            "video": "count_1.mp4",
            "duration": 120,
            "question": "How many times does the man jump?",
            "candidates": ["2", "3", "4", "5"],
            "answer": "4",
            "question_type": "count",
        },
        {
            "video": "count_2.mp4",
            "question": "How many cars?",
            "candidates": ["1", "2"],
            "answer": "seven",
            "question_type": "count",
        },
    ]
    _touch(tmp_path / "count_1.mp4")
    _touch(tmp_path / "count_2.mp4")
    path = tmp_path / "4_count.json"
    path.write_text(json.dumps(rows))
    report, layout = B.load_benchmark(path)
    assert layout == "mlvu"
    # "4" is option text, not an index: it is the third candidate.
    assert [r.answer for r in report.records] == ["C"]
    assert report.skipped == {"invalid_answer": 1} and "seven" in report.errors[0]


LVB_ROWS = [
    {
        "video_id": "86CxyhFV9MI",
        "video_path": "86CxyhFV9MI.mp4",
        "duration": 17.0,
        "duration_group": 15,
        "question": "At the beginning of the video, a woman wearing a white shirt is standing. What changes?",
        "question_wo_referring_query": "What changes?",
        "candidates": ["She sits", "She runs", "She waves"],
        "correct_choice": 2,
        "option0": "She sits",
        "option1": "She runs",
        "option2": "She waves",
        "option3": "N/A",
        "option4": "N/A",
        "id": "86CxyhFV9MI_0",
        "question_category": "E2O",
        "level": "L1-Perception",
        "subtitle_path": "86CxyhFV9MI_en.json",
        "starting_timestamp_for_subtitles": 0,
        "view_count": 10,
        "topic_category": "NP-News-Programs",
    },
    {  # a test-split row: no ground truth
        "video_path": "abc.mp4",
        "question": "What is shown?",
        "option0": "x",
        "option1": "y",
        "option2": "N/A",
        "option3": "N/A",
        "option4": "N/A",
        "id": "abc_0",
    },
]


def test_longvideobench_layout(tmp_path: Path) -> None:
    _touch(tmp_path / "videos" / "86CxyhFV9MI.mp4")
    _touch(tmp_path / "videos" / "abc.mp4")
    path = tmp_path / "lvb_val.json"
    path.write_text(json.dumps(LVB_ROWS))
    report, layout = B.load_benchmark(path)
    assert layout == "longvideobench"
    assert report.skipped == {"missing_answer": 1} and "correct_choice" in report.errors[0]
    rec = report.records[0]
    assert rec.sample_id == "86CxyhFV9MI_0" and rec.answer == "C" and rec.data_source == "longvideobench/15"
    assert rec.options == ("A. She sits", "B. She runs", "C. She waves")  # N/A options dropped
    assert rec.video == (tmp_path / "videos" / "86CxyhFV9MI.mp4").absolute()


def test_check_videos_false_resolves_without_files(tmp_path: Path) -> None:
    path = tmp_path / "lvb.json"
    path.write_text(json.dumps(LVB_ROWS[:1]))
    report, _ = B.load_benchmark(path, check_videos=False)
    assert report.records[0].video == (tmp_path / "videos" / "86CxyhFV9MI.mp4").absolute()


def test_videor1_files_go_to_the_record_loader(tmp_path: Path) -> None:
    _touch(tmp_path / "v.mp4")
    rows = [
        {
            "problem_id": "p1",
            "problem": "What colour?\nOptions:\nA. red\nB. blue",
            "solution": "<answer>B</answer>",
            "problem_type": "multiple choice",
            "modality_type": "video",
            "video": "v.mp4",
        }
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows))
    report, layout = B.load_benchmark(path)
    assert layout == "videor1" and report.records[0].answer == "B"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"videoID": "a", "question": "q", "options": ["A. x"], "answer": "A"}, "invalid_field"),
        ({"videoID": "a", "question": "q", "options": ["A. x", "B. y"], "answer": "E"}, "invalid_answer"),
        ({"videoID": "a", "question": "q", "options": "A. x", "answer": "A"}, "invalid_field"),
        ({"videoID": "a", "options": ["A. x", "B. y"], "answer": "A"}, "missing_field"),
        ({"videoID": "a", "question": "q", "answer": "A"}, "missing_field"),
    ],
)
def test_bad_rows_are_skipped_with_a_reason(tmp_path: Path, row: dict, reason: str) -> None:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps([row]))
    report, _ = B.load_benchmark(path, check_videos=False)
    assert report.records == [] and report.skipped == {reason: 1}
    assert report.errors[0].startswith(str(path)) and "row 0" in report.errors[0]


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(B.BenchmarkError, match="does not exist"):
        B.load_benchmark(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(B.BenchmarkError, match="not valid JSON"):
        B.load_benchmark(bad)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(B.BenchmarkError, match="cannot tell the benchmark layout"):
        B.load_benchmark(odd)
    with pytest.raises(B.BenchmarkError, match="unknown benchmark layout"):
        B.load_benchmark(odd, layout="egoschema")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": VIDEOMME_ROWS[:1]}))
    report, layout = B.load_benchmark(wrapped, check_videos=False)
    assert layout == "videomme" and len(report.records) == 1
