"""Video-R1 JSON records: load, validate, save.

Two schemas are accepted (method.md, "Training data and blind test"):
- the CaCoVID filtered file: ``problem`` (question with its options), ``solution``
  (``<answer>X</answer>``), ``problem_type``, ``modality_type`` (``"video"``) and ``video`` (a path
  relative to a video root);
- the upstream Video-R1 file: ``problem`` (question only), ``options``, ``solution``,
  ``problem_type``, ``data_type``, ``path``, ``problem_id``, ``data_source``. Its options are appended
  to the question the way Video-R1 builds its prompt ("Options:" then one option per line).

Every problem is reported, never silently dropped: a record that is not a mapping, lacks a field,
is an image record, has an unknown problem type, holds text that is not valid UTF-8, names a video outside
the video root or points to a missing video is skipped, counted under a reason in ``LoadReport.skipped`` and
described (record index and field) in ``LoadReport.errors``.

A video path must stay inside the video root (``..`` and absolute paths elsewhere are skipped) unless the
caller allows it (``data.allow_outside_video_root``): a records file must not make reward actors open
arbitrary files, and the skip message for such a path never says whether it exists.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cacovid_rl.answers import PROBLEM_TYPES, extract_answer


class DataError(ValueError):
    """A data file cannot be read at all (missing, malformed JSON, wrong top-level type)."""


@dataclass(frozen=True)
class QARecord:
    """One video question. ``answer`` is the ground truth parsed from ``solution`` by the reward's own parser
    (``cacovid_rl.answers.extract_answer``); ``video`` is absolute."""

    sample_id: str
    problem: str
    answer: str
    solution: str
    problem_type: str
    video: Path
    options: tuple[str, ...] = ()
    data_source: str = ""


@dataclass
class LoadReport:
    """Records that loaded, and for the rest: counts per skip reason and one message per skipped record."""

    records: list[QARecord] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{len(self.records)} records loaded, {self.num_skipped} skipped ({reasons})"


class _Skip(ValueError):
    """An unusable record: the reason it is skipped (counted by the loader) and a message naming index + field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _read_json_list(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    # Undecodable bytes become lone surrogates (surrogateescape), so one bad byte costs its record, not the
    # file; ``_text_field`` names the record and field that holds it.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"data file '{path}' is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    if not isinstance(data, list):
        raise DataError(f"data file '{path}' must hold a JSON list of records, found {type(data).__name__}")
    return data


def _text_field(raw: dict[str, Any], name: str, index: int) -> str:
    if name not in raw or raw[name] is None:
        raise _Skip("missing_field", f"record {index}: missing field '{name}'")
    value = raw[name]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise _Skip("invalid_field", f"record {index}: field '{name}' must be a string, got {type(value).__name__}")
    return _valid_text(str(value), name, index)


def _valid_text(value: str, name: str, index: int) -> str:
    """``value``, unless it holds a lone surrogate (an undecodable byte of the file, or a ``\\udcff`` escape):
    the tokenizer raises on those deep inside a reward actor, far from the file; rejected here, the record is skipped
    once with its index and field named."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Skip(
            "invalid_text", f"record {index}: field '{name}' is not valid UTF-8 text (character {exc.start})"
        ) from None
    return value


def _options_field(raw: dict[str, Any], index: int) -> tuple[str, ...]:
    value = raw.get("options")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Skip("invalid_field", f"record {index}: field 'options' must be a list of strings")
    return tuple(_valid_text(v, "options", index) for v in value)


def parse_record(
    raw: Any, index: int, video_root: Path, check_videos: bool = True, allow_outside_root: bool = False
) -> QARecord:
    """Validate one raw record; raise ``_Skip`` (reason + message naming index and field) when unusable."""
    if not isinstance(raw, dict):
        raise _Skip("invalid_record", f"record {index}: must be a JSON object, got {type(raw).__name__}")
    upstream = "video" not in raw and "path" in raw
    video_key = "path" if upstream else "video"
    modality_key = "data_type" if upstream else "modality_type"
    modality = raw.get(modality_key, raw.get("data_type", "video"))
    if modality != "video":
        raise _Skip("not_video", f"record {index}: field '{modality_key}' is {modality!r}; only video records are used")
    problem = _text_field(raw, "problem", index)
    solution = _text_field(raw, "solution", index)
    problem_type = _text_field(raw, "problem_type", index)
    if problem_type not in PROBLEM_TYPES:
        raise _Skip(
            "unknown_problem_type",
            f"record {index}: field 'problem_type' is {problem_type!r}; expected one of {list(PROBLEM_TYPES)}",
        )
    video_rel = _text_field(raw, video_key, index)
    if not video_rel.strip():
        raise _Skip("missing_field", f"record {index}: field '{video_key}' is empty")
    options = _options_field(raw, index)
    if upstream and options:
        problem = problem.rstrip("\n") + "\nOptions:\n" + "\n".join(options)
    video = Path(video_rel)
    if not video.is_absolute():
        video = video_root / video
    video = Path(os.path.normpath(video.absolute()))
    root = Path(os.path.normpath(Path(video_root).absolute()))
    if not allow_outside_root and not video.is_relative_to(root):
        # Decided on the path alone, before any filesystem access: the message must not reveal whether it exists.
        raise _Skip(
            "video_outside_root",
            f"record {index}: field '{video_key}' leaves data.video_root (set data.allow_outside_video_root to "
            "accept paths outside it)",
        )
    if check_videos and not video.is_file():
        raise _Skip("missing_video", f"record {index}: field '{video_key}': video file '{video}' not found")
    sample_id = raw.get("problem_id", raw.get("id"))
    if isinstance(sample_id, str):
        _valid_text(sample_id, "problem_id", index)  # it seeds the question's RNG and names it in every log line
    return QARecord(
        sample_id=str(sample_id) if sample_id is not None else str(index),
        problem=problem,
        answer=extract_answer(solution),
        solution=solution,
        problem_type=problem_type,
        video=video,
        options=options,
        data_source=str(raw.get("data_source", "") or ""),
    )


def load_records(
    path: str | Path,
    video_root: str | Path | None = None,
    check_videos: bool = True,
    allow_outside_root: bool = False,
) -> LoadReport:
    """Load and validate a Video-R1 JSON list (either schema).

    ``video_root`` defaults to the JSON file's directory. Raises ``DataError`` only when the file
    itself is unusable; bad records are skipped and reported in the returned ``LoadReport``.
    """
    p = Path(path)
    root = Path(video_root) if video_root not in (None, "") else p.parent
    report = LoadReport()
    for i, raw in enumerate(_read_json_list(p)):
        try:
            report.records.append(parse_record(raw, i, root, check_videos, allow_outside_root))
        except _Skip as skip:
            report.skipped[skip.reason] += 1
            report.errors.append(f"{p}: {skip}")
    return report


def record_to_dict(record: QARecord, video_root: str | Path | None = None) -> dict[str, Any]:
    """A record in the CaCoVID schema; the video path is made relative to ``video_root`` when it lies under it."""
    video = record.video
    if video_root not in (None, ""):
        with contextlib.suppress(ValueError):
            video = video.relative_to(Path(video_root).absolute())
    return {
        "problem_id": record.sample_id,
        "problem": record.problem,
        "solution": record.solution,
        "problem_type": record.problem_type,
        "modality_type": "video",
        "video": str(video),
        "options": list(record.options),
        "data_source": record.data_source,
    }


def save_records(records: Iterable[QARecord], path: str | Path, video_root: str | Path | None = None) -> Path:
    """Write records as a CaCoVID-schema JSON list (atomically: a temporary file, then a rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = [record_to_dict(r, video_root) for r in records]
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p
