"""Blind-test filter: ask the frozen LLM every question without its video; keep the ones it gets wrong.

Why: a question the LLM answers from the text alone rewards every token combination equally, so it
carries no learning signal for a token-selection policy (method.md, "Training data and blind test";
the reference gives no code for this step).

Resumable: one JSON line per record is appended to ``<out>.progress.jsonl`` (and flushed) as soon as
it is answered; a rerun reads that file and only asks the records not finished yet. A record whose
prompt or answer fails is skipped (not written to the output), counted under ``errors`` and retried
by the next run. The final outputs are the kept records (``out``, CaCoVID schema) and a summary
(``<out stem>.summary.json``) with counts per problem type.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import QARecord, load_records, save_records

log = logging.getLogger(__name__)


class TextOnlyAnswerer(Protocol):
    """The one adapter method the blind test needs (``VideoLLMAdapter`` provides it)."""

    def generate_text_only(self, prompt: str, max_new_tokens: int = 16) -> str: ...


@dataclass
class TypeCounts:
    total: int = 0
    dropped: int = 0
    kept: int = 0
    errors: int = 0


@dataclass
class BlindTestSummary:
    """Counts of the run; ``dropped`` = answered correctly without video, ``kept`` = written to the output."""

    total: int = 0
    dropped: int = 0
    kept: int = 0
    errors: int = 0
    resumed: int = 0
    """Records whose result came from the progress file of an earlier (interrupted) run."""
    per_type: dict[str, TypeCounts] = field(default_factory=dict)
    out_path: str = ""
    summary_path: str = ""
    model: str = ""
    """Fingerprint of the LLM that answered (``model_fingerprint``): a cached result of another model is redone."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def progress_path(out_path: str | Path) -> Path:
    p = Path(out_path)
    return p.with_name(p.name + ".progress.jsonl")


def summary_path(out_path: str | Path) -> Path:
    p = Path(out_path)
    return p.with_name(p.stem + ".summary.json")


def _key(index: int, record: QARecord) -> str:
    # The index disambiguates duplicate sample ids; a rerun must pass the same record list.
    return f"{index}:{record.sample_id}"


def _read_progress(path: Path) -> dict[str, dict[str, Any]]:
    """Finished results by key; a torn last line (the run was killed mid-write) is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "key" in row and "error" not in row:
            done[row["key"]] = row
    return done


def run_blind_test(
    records: Sequence[QARecord],
    adapter: TextOnlyAnswerer,
    out_path: str | Path,
    max_new_tokens: int = 16,
    progress: bool = True,
    correct_threshold: float = 1.0,
    video_root: str | Path | None = None,
    model: str = "",
    fix_official_bugs: bool = True,
) -> BlindTestSummary:
    """Ask each question without video; write the records answered wrongly to ``out_path``; return the counts.

    A record is dropped when its reward (``cacovid_rl.rl.rewards.compute_reward``) reaches
    ``correct_threshold`` (1.0: fully correct). ``video_root``, if given, makes the written video
    paths relative to it; otherwise they stay absolute. ``model`` (a fingerprint) is recorded in the summary.
    ``fix_official_bugs`` is the reward's switch (``reward.fix_official_bugs``).
    """
    from cacovid_rl.rl.rewards import compute_reward

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    prog = progress_path(out)
    done = _read_progress(prog)
    summary = BlindTestSummary(out_path=str(out), summary_path=str(summary_path(out)), model=model)
    kept: list[QARecord] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc="blind test", unit="q", disable=None)  # off when not a terminal
    with prog.open("a", encoding="utf-8") as log:
        if prog.stat().st_size and not prog.read_bytes().endswith(b"\n"):
            log.write("\n")  # end the torn line of a killed run so the next row starts on its own line
        for i, rec in enumerate(records):
            key = _key(i, rec)
            counts = summary.per_type.setdefault(rec.problem_type, TypeCounts())
            summary.total += 1
            counts.total += 1
            row = done.get(key)
            if row is not None:
                summary.resumed += 1
            else:
                try:
                    prediction = adapter.generate_text_only(build_prompt(rec.problem, rec.problem_type), max_new_tokens)
                    reward = float(compute_reward(prediction, rec.answer, rec.problem_type, fix_official_bugs))
                    row = {"key": key, "prediction": prediction, "reward": reward}
                except Exception as exc:  # a bad record must not stop a long run: count it, retry next run
                    log.write(json.dumps({"key": key, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
                    log.flush()
                    summary.errors += 1
                    counts.errors += 1
                    if bar is not None:
                        bar.update(1)
                    continue
                log.write(json.dumps(row) + "\n")
                log.flush()
            if row["reward"] >= correct_threshold:
                summary.dropped += 1
                counts.dropped += 1
            else:
                summary.kept += 1
                counts.kept += 1
                kept.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(dropped=summary.dropped, kept=summary.kept)
    if bar is not None:
        bar.close()
    save_records(kept, out, video_root=video_root)
    summary_path(out).write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    return summary


def blind_filtered_path(train_path: str | Path) -> Path:
    """Where ``filter_training_file`` writes the kept records of ``train_path``: ``<stem>.blind.json`` beside it."""
    p = Path(train_path)
    return p.with_name(p.stem + ".blind.json")


def model_fingerprint(model_dir: str | Path) -> str:
    """Identifies a local checkpoint without reading its weights (a 7B one is ~15 GB): the directory, its
    ``config.json`` and the name, size and modification time of each weight file."""
    d = Path(model_dir).resolve()
    h = hashlib.sha256(str(d).encode())
    cfg = d / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def filter_training_file(
    train_path: str | Path,
    video_root: str | Path,
    adapter_factory: Callable[[], TextOnlyAnswerer],
    max_new_tokens: int = 16,
    model: str = "",
) -> tuple[Path, BlindTestSummary | None]:
    """Blind-test ``train_path`` once: the kept records' file (video paths relative to ``video_root``) and the counts.

    When a complete earlier run of the same ``model`` (fingerprint) wrote the kept file (its summary counts no
    errors) it is returned as is (summary ``None``) and no model is loaded. Results of another model (a
    retrained or replaced checkpoint) are discarded. Otherwise ``adapter_factory()`` builds the LLM and the
    run resumes, asking only the questions not answered yet (errored ones included).
    """
    out = blind_filtered_path(train_path)
    done = summary_path(out)
    prev = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else None
    if prev is not None and prev.get("model", "") != model:
        log.warning(
            "%s was made by another model (%s, now %s): running the blind test again",
            out,
            prev.get("model") or "unrecorded",
            model or "unrecorded",
        )
        for stale in (out, done, progress_path(out)):
            stale.unlink(missing_ok=True)
    elif out.is_file() and prev is not None and prev.get("errors") == 0:
        return out, None
    report = load_records(train_path, video_root, check_videos=False)
    summary = run_blind_test(report.records, adapter_factory(), out, max_new_tokens, video_root=video_root, model=model)
    return out, summary
