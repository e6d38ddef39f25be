"""Real video-QA benchmark files (Video-MME, MLVU, LongVideoBench) as ``QARecord``s, in their lmms-eval layouts.

The evaluation report (``cacovid_rl.eval.report``) runs on these files the same way it runs on the synthetic
split: every benchmark question becomes a multiple-choice ``QARecord`` whose ``problem`` is the question
followed by ``Options:`` and one ``A. text`` line per option (the Video-R1 prompt layout the policy was
trained on), ``answer`` is the option letter, and ``video`` is the resolved video file.

Layouts (from the lmms-eval task YAMLs and ``utils.py`` of ``videomme``, ``mlvu``, ``longvideobench``):

- **Video-MME** (``lmms-lab/Video-MME``, ``videomme/test-00000-of-00001.parquet``): ``videoID``,
  ``question_id``, ``duration`` (short/medium/long), ``domain``, ``sub_category``, ``task_type``,
  ``question``, ``options`` (a list of ``"A. ..."`` strings), ``answer`` (a letter). The video is
  ``<root>/data/<videoID>.mp4`` (``.MP4`` and ``.mkv`` are tried too).
- **MLVU** (``sy1998/MLVU_dev`` / ``MLVU_Test`` as used by lmms-eval): ``video_name``, ``question`` with the
  options inline as ``(A) ...`` lines, optionally ``candidates``, ``answer`` (a letter, ``(A)`` or the option
  text), ``task_type``, ``question_id``. The original MLVU ``json/*.json`` files (``video``, ``question``,
  ``candidates``, ``answer`` as option text, ``question_type``) are read too. The video is looked up as
  ``<root>/<name>``, ``<root>/video/<name>`` and one directory level deeper (MLVU groups videos by task).
- **LongVideoBench** (``longvideobench/LongVideoBench``, ``lvb_val.json`` or the ``validation`` parquet):
  ``id``, ``video_id``, ``video_path``, ``question``, ``option0`` .. ``option4`` (``"N/A"`` when unused) or
  ``candidates``, ``correct_choice`` (an option index), ``duration_group``, ``question_category``. The video
  is ``<root>/videos/<video_path>`` or ``<root>/<video_path>``. Test-split rows without ``correct_choice``
  are skipped (``missing_answer``).

Files may be ``.json`` (a list of rows, or an object holding one under ``data``/``rows``/``test``/
``validation``), ``.jsonl`` or ``.parquet`` (needs ``pyarrow``: ``pip install 'cacovid-rl[report]'``).
Rows that cannot be used are skipped and counted by reason, never fatal, like ``data.records.load_records``.
Files in the Video-R1 / CaCoVID schema (``problem`` + ``solution``) go to ``data.records.load_records``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cacovid_rl.data.records import LoadReport, QARecord, load_records

LAYOUTS = ("videomme", "mlvu", "longvideobench", "videor1")
"""Benchmark layouts ``load_benchmark`` understands (``auto`` detects one from the first row)."""
LETTERS = "ABCDEFGHIJ"
VIDEO_EXTENSIONS = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")

_INLINE_OPTION = re.compile(r"^\s*\(([A-J])\)\s*(.*?)\s*$")
_LETTER_PREFIX = re.compile(r"^\s*\(?([A-J])[\.\):]\s*")
_BARE_LETTER = re.compile(r"^\s*\(?([A-J])\)?\s*\.?\s*$")


class BenchmarkError(ValueError):
    """A benchmark file cannot be read at all (missing, unreadable format, unknown layout, no pyarrow)."""


class _Skip(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------------
# reading files


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``.json``, ``.jsonl`` or ``.parquet`` benchmark file as plain dicts."""
    p = Path(path)
    if not p.is_file():
        raise BenchmarkError(f"benchmark file '{p}' does not exist")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(p)
    text = p.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"'{p}' line {lineno} is not valid JSON: {exc.msg}") from exc
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"'{p}' is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    if isinstance(data, dict):
        for key in ("data", "rows", "test", "validation", "val"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise BenchmarkError(f"'{p}' must hold a JSON list of rows (or an object with one under 'data')")
    return data


def _read_parquet(p: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BenchmarkError(
            f"reading '{p}' needs pyarrow, which is not installed: pip install 'cacovid-rl[report]' "
            "(or convert the file to JSON/JSONL)"
        ) from exc
    try:
        return pq.read_table(p).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise BenchmarkError(f"'{p}' is not a readable parquet file: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------------
# layout detection and field helpers


def detect_layout(row: dict[str, Any]) -> str:
    """The layout of one row (see ``LAYOUTS``), from the fields only that layout has."""
    if not isinstance(row, dict):
        raise BenchmarkError(f"benchmark rows must be objects, got {type(row).__name__}")
    if "problem" in row and "solution" in row:
        return "videor1"
    if "videoID" in row:
        return "videomme"
    if "correct_choice" in row or "option0" in row or "video_path" in row:
        return "longvideobench"
    if "video_name" in row or "question_type" in row or ("candidates" in row and "video" in row):
        return "mlvu"
    raise BenchmarkError(
        f"cannot tell the benchmark layout from fields {sorted(row)[:12]}; expected Video-MME (videoID), "
        "MLVU (video_name / candidates), LongVideoBench (video_path, option0, correct_choice) or Video-R1 "
        "(problem, solution)"
    )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(row: dict[str, Any], name: str, index: int) -> str:
    value = row.get(name)
    if _missing(value):
        raise _Skip("missing_field", f"row {index}: missing field '{name}'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Skip("invalid_field", f"row {index}: field '{name}' must be text, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise _Skip("missing_field", f"row {index}: field '{name}' is empty")
    return text


def _strip_letter(option: str, position: int) -> str:
    """``"A. text"`` / ``"(A) text"`` -> ``"text"`` when the letter is the option's own position."""
    m = _LETTER_PREFIX.match(option)
    if m and m.group(1) == LETTERS[position]:
        return option[m.end() :].strip()
    return option.strip()


def _options_list(value: Any, name: str, index: int) -> list[str]:
    if hasattr(value, "tolist"):  # numpy arrays from some parquet readers
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _Skip("invalid_field", f"row {index}: field '{name}' must be a list of strings")
    return list(value)


def _letter_answer(value: Any, options: Sequence[str], field: str, index: int, is_index: bool = False) -> str:
    """The answer as a letter: the option text itself, a letter (``A``, ``(A)``), or an option index.

    Numbers are option indices (``correct_choice``); digit strings are indices only when ``is_index``, since
    MLVU answers are option texts and a count question's answer text may be ``"4"``.
    """
    if _missing(value):
        raise _Skip("missing_answer", f"row {index}: no answer in field '{field}' (a test split without labels?)")
    if isinstance(value, bool):
        raise _Skip("invalid_answer", f"row {index}: field '{field}' is a boolean")
    text = str(value).strip()
    if isinstance(value, (int, float)) or (is_index and text.isdigit()):
        i = int(float(value))
        if not 0 <= i < len(options):
            raise _Skip("invalid_answer", f"row {index}: field '{field}' = {value!r} is not an option index")
        return LETTERS[i]
    folded = [o.strip().casefold() for o in options]
    if text.casefold() in folded:
        return LETTERS[folded.index(text.casefold())]
    m = _BARE_LETTER.match(text)
    if m and LETTERS.index(m.group(1)) < len(options):
        return m.group(1)
    raise _Skip("invalid_answer", f"row {index}: field '{field}' = {text[:60]!r} matches no option")


def _find_video(root: Path, names: Sequence[str], subdirs: Sequence[str], deep: bool = False) -> Path | None:
    """The first existing ``root/subdir/name`` (and, with ``deep``, ``root/subdir/*/name``)."""
    for sub in subdirs:
        base = root / sub if sub else root
        for name in names:
            cand = base / name
            if cand.is_file():
                return cand
        if deep and base.is_dir():
            for child in sorted(base.iterdir()):
                if child.is_dir():
                    for name in names:
                        if (child / name).is_file():
                            return child / name
    return None


def _resolve(
    root: Path, names: Sequence[str], subdirs: Sequence[str], field: str, index: int, check: bool, deep: bool = False
) -> Path:
    absolute = [Path(n) for n in names if Path(n).is_absolute()]
    for a in absolute:
        if a.is_file() or not check:
            return a
    found = _find_video(root, names, subdirs, deep)
    if found is not None:
        return Path(os.path.normpath(found.absolute()))
    if check:
        tried = ", ".join(str((root / s / names[0]) if s else root / names[0]) for s in subdirs[:3])
        raise _Skip("missing_video", f"row {index}: field '{field}': no video found (tried {tried})")
    first = subdirs[0]
    return Path(os.path.normpath((root / first / names[0] if first else root / names[0]).absolute()))


def _record(sample_id: str, question: str, options: Sequence[str], letter: str, video: Path, source: str) -> QARecord:
    lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return QARecord(
        sample_id=sample_id,
        problem=question.rstrip() + "\nOptions:\n" + "\n".join(lines),
        answer=letter,
        solution=f"<answer>{letter}</answer>",
        problem_type="multiple choice",
        video=video,
        options=tuple(lines),
        data_source=source,
    )


def _check_options(options: Sequence[str], index: int) -> None:
    if len(options) < 2:
        raise _Skip("invalid_field", f"row {index}: needs at least 2 options, found {len(options)}")
    if len(options) > len(LETTERS):
        raise _Skip("invalid_field", f"row {index}: {len(options)} options, at most {len(LETTERS)} supported")


# ----------------------------------------------------------------------------------------------------------------------
# one parser per layout


def parse_videomme(row: dict[str, Any], index: int, root: Path, check_videos: bool = True) -> QARecord:
    """One Video-MME row (lmms-eval ``videomme``) as a ``QARecord``."""
    video_id = _text(row, "videoID", index)
    question = _text(row, "question", index)
    if _missing(row.get("options")):
        raise _Skip("missing_field", f"row {index}: missing field 'options'")
    options = [_strip_letter(o, i) for i, o in enumerate(_options_list(row["options"], "options", index))]
    _check_options(options, index)
    letter = _letter_answer(row.get("answer"), options, "answer", index)
    names = [video_id + ext for ext in VIDEO_EXTENSIONS]
    video = _resolve(root, names, ("data", "", "videos", "video"), "videoID", index, check_videos)
    sample_id = str(row.get("question_id") or f"{video_id}-{index}")
    source = "videomme/" + str(row.get("duration") or row.get("task_type") or "all")
    return _record(sample_id, question, options, letter, video, source)


def _split_inline_options(question: str) -> tuple[str, list[str]]:
    """MLVU questions carry their options as ``(A) ...`` lines: (question text, option texts)."""
    text_lines, options = [], []
    for line in question.splitlines():
        m = _INLINE_OPTION.match(line)
        if m and LETTERS.index(m.group(1)) == len(options):
            options.append(m.group(2))
            continue
        s = line.strip()
        if s and s.lower().rstrip(":") not in ("options", "option"):
            text_lines.append(s)
    return " ".join(text_lines).strip(), options


def parse_mlvu(row: dict[str, Any], index: int, root: Path, check_videos: bool = True) -> QARecord:
    """One MLVU row (lmms-eval ``mlvu_dev``/``mlvu_test``, or the original MLVU json) as a ``QARecord``."""
    name_field = "video_name" if not _missing(row.get("video_name")) else "video"
    video_name = _text(row, name_field, index)
    question, inline = _split_inline_options(_text(row, "question", index))
    if not question:
        raise _Skip("missing_field", f"row {index}: field 'question' holds only options")
    candidates = row.get("candidates")
    options = inline or ([] if _missing(candidates) else _options_list(candidates, "candidates", index))
    _check_options(options, index)
    letter = _letter_answer(row.get("answer"), options, "answer", index)
    task = str(row.get("task_type") or row.get("question_type") or "all")
    source_dir = Path(str(row.get("source_file") or "")).stem
    subdirs = ("", "video", *([f"video/{source_dir}"] if source_dir else []), "videos")
    video = _resolve(root, [video_name], subdirs, name_field, index, check_videos, deep=True)
    sample_id = str(row.get("question_id") or f"mlvu-{task}-{index}")
    return _record(sample_id, question, options, letter, video, "mlvu/" + task)


def parse_longvideobench(row: dict[str, Any], index: int, root: Path, check_videos: bool = True) -> QARecord:
    """One LongVideoBench row (lmms-eval ``longvideobench_val_v``) as a ``QARecord``."""
    question = _text(row, "question", index)
    if any(f"option{i}" in row for i in range(5)):
        options = []
        for i in range(5):
            value = row.get(f"option{i}")
            if _missing(value) or str(value).strip() in ("N/A", ""):
                break
            options.append(str(value).strip())
    elif not _missing(row.get("candidates")):
        options = _options_list(row["candidates"], "candidates", index)
    else:
        raise _Skip("missing_field", f"row {index}: no options (option0..option4 or candidates)")
    _check_options(options, index)
    field = "answer" if "answer" in row and "correct_choice" not in row else "correct_choice"
    letter = _letter_answer(row.get(field), options, field, index, is_index=field == "correct_choice")
    video_path = _text(row, "video_path", index) if "video_path" in row else _text(row, "video_id", index) + ".mp4"
    video = _resolve(root, [video_path], ("videos", ""), "video_path", index, check_videos)
    sample_id = str(row.get("id") or f"lvb-{index}")
    source = "longvideobench/" + str(row.get("duration_group") or row.get("question_category") or "all")
    return _record(sample_id, question, options, letter, video, source)


PARSERS: dict[str, Callable[[dict[str, Any], int, Path, bool], QARecord]] = {
    "videomme": parse_videomme,
    "mlvu": parse_mlvu,
    "longvideobench": parse_longvideobench,
}


def load_benchmark(
    path: str | Path,
    video_root: str | Path | None = None,
    layout: str = "auto",
    check_videos: bool = True,
) -> tuple[LoadReport, str]:
    """Load a benchmark file as ``QARecord``s; returns the ``LoadReport`` and the layout used.

    ``video_root`` defaults to the file's directory. ``layout`` is one of ``LAYOUTS`` or ``auto`` (detected
    from the first row). Raises ``BenchmarkError`` only when the file itself is unusable.
    """
    p = Path(path)
    root = Path(video_root) if video_root not in (None, "") else p.parent
    if layout not in (*LAYOUTS, "auto"):
        raise BenchmarkError(f"unknown benchmark layout {layout!r}; expected one of {[*LAYOUTS, 'auto']}")
    rows = read_rows(p)
    if layout == "auto":
        if not rows:
            return LoadReport(), "auto"
        layout = detect_layout(rows[0])
    if layout == "videor1":
        if p.suffix.lower() != ".json":
            raise BenchmarkError(f"'{p}': Video-R1 / CaCoVID records are read from a .json list only")
        return load_records(p, root, check_videos=check_videos), "videor1"
    parse = PARSERS[layout]
    report = LoadReport()
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _Skip("invalid_record", f"row {i}: must be an object, got {type(row).__name__}")
            report.records.append(parse(row, i, root, check_videos))
        except _Skip as skip:
            report.skipped[skip.reason] += 1
            report.errors.append(f"{p}: {skip}")
    return report, layout
