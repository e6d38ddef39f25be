"""Blind test: drops what the model answers without video, writes the rest, resumes after interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cacovid_rl.data.blind_test import progress_path, run_blind_test, summary_path
from cacovid_rl.data.records import QARecord, load_records


class FakeAdapter:
    """Answers 'D'/'1' about the white box, '2' to counts, 'A' otherwise; can fail on a marker or after N calls."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail_after = fail_after

    def generate_text_only(self, prompt: str, max_new_tokens: int = 16) -> str:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # the run is killed mid-way
        self.calls.append(prompt)
        if "BROKEN" in prompt:
            raise RuntimeError("tokenizer exploded")
        if "white box" in prompt:
            return "1" if "How many" in prompt else "D"
        return "2" if "How many" in prompt else "A"


def _records(tmp_path: Path) -> list[QARecord]:
    video = tmp_path / "v.mp4"
    video.write_bytes(b"\x00")
    mc = "\nOptions:\nA. red\nB. green\nC. blue\nD. yellow"
    rows = [
        ("What colour are the dots in the white box ?" + mc, "D", "multiple choice"),  # prior: dropped
        ("What colour are the dots in the pink box ?" + mc, "C", "multiple choice"),  # kept
        ("What colour are the dots in the cyan box ?" + mc, "A", "multiple choice"),  # lucky guess: dropped
        ("How many dots are in the orange box ?", "2", "numerical"),  # dropped
        ("How many dots are in the brown box ?", "3", "numerical"),  # kept
        ("What colour are the dots in the white box ?" + mc, "D", "multiple choice"),  # dropped
    ]
    return [QARecord(f"s{i}", p, a, f"<answer>{a}</answer>", t, video) for i, (p, a, t) in enumerate(rows)]


def test_drops_what_is_answered_without_video(tmp_path: Path) -> None:
    recs = _records(tmp_path)
    adapter = FakeAdapter()
    out = tmp_path / "filtered.json"
    s = run_blind_test(recs, adapter, out, progress=False)
    assert (s.total, s.dropped, s.kept, s.errors, s.resumed) == (6, 4, 2, 0, 0)
    assert s.per_type["multiple choice"].dropped == 3 and s.per_type["multiple choice"].kept == 1
    assert s.per_type["numerical"].dropped == 1 and s.per_type["numerical"].kept == 1
    assert all("Please provide" in p and "<video>" not in p for p in adapter.calls)
    kept = load_records(out, tmp_path).records
    assert [r.sample_id for r in kept] == ["s1", "s4"]
    assert kept == [recs[1], recs[4]]
    summary = json.loads(summary_path(out).read_text())
    assert summary["dropped"] == 4 and summary["per_type"]["numerical"] == {
        "total": 2,
        "dropped": 1,
        "kept": 1,
        "errors": 0,
    }


def test_resumes_after_interruption(tmp_path: Path) -> None:
    recs = _records(tmp_path)
    out = tmp_path / "filtered.json"
    with pytest.raises(KeyboardInterrupt):
        run_blind_test(recs, FakeAdapter(fail_after=3), out, progress=False)
    assert len(progress_path(out).read_text().splitlines()) == 3
    with progress_path(out).open("a") as f:
        f.write('{"key": "3:s3", "predic')  # a torn line from the kill is ignored
    second = FakeAdapter()
    s = run_blind_test(recs, second, out, progress=False)
    assert len(second.calls) == 3  # only the unfinished records are asked again
    assert (s.total, s.dropped, s.kept, s.resumed) == (6, 4, 2, 3)
    assert [r.sample_id for r in load_records(out, tmp_path).records] == ["s1", "s4"]
    third = FakeAdapter()
    assert run_blind_test(recs, third, out, progress=False).resumed == 6 and third.calls == []


def test_bad_record_is_skipped_counted_and_retried(tmp_path: Path) -> None:
    recs = _records(tmp_path)
    bad = QARecord("bad", "BROKEN question", "A", "A", "multiple choice", recs[0].video)
    out = tmp_path / "filtered.json"
    s = run_blind_test([*recs, bad], FakeAdapter(), out, progress=False)
    assert s.errors == 1 and s.per_type["multiple choice"].errors == 1
    assert s.kept + s.dropped == 6
    assert "bad" not in [r.sample_id for r in load_records(out, tmp_path).records]
    retry = FakeAdapter()
    run_blind_test([*recs, bad], retry, out, progress=False)
    assert len(retry.calls) == 1  # the errored record is not "finished": the rerun asks it again


def test_training_file_is_filtered_once_and_the_run_config_names_it(tmp_path: Path, monkeypatch) -> None:
    """``data.blind_filter``: ``cacovid-rl train`` blind-tests train_path once, then trains on (and records) it."""
    from cacovid_cli.training import blind_filter
    from cacovid_rl.config import load_config
    from cacovid_rl.data.blind_test import blind_filtered_path
    from cacovid_rl.data.records import save_records
    from cacovid_rl.models import loading

    train = tmp_path / "data" / "train.json"
    save_records(_records(tmp_path), train, video_root=tmp_path)
    built: list[FakeAdapter] = []
    monkeypatch.setattr(loading, "load_adapter", lambda cfg: built.append(FakeAdapter()) or built[-1])
    overrides = [f"data.train_path={train}", f"data.video_root={tmp_path}", "data.blind_filter=true"]
    cfg = blind_filter(load_config(None, overrides))
    out = blind_filtered_path(train)
    assert out == tmp_path / "data" / "train.blind.json" and cfg.data.train_path == str(out)
    assert not cfg.data.blind_filter  # the resolved config (config.yaml of the run) reads the filtered file as is
    assert [r.sample_id for r in load_records(cfg.data.train_path, tmp_path).records] == ["s1", "s4"]
    assert len(built) == 1 and len(built[0].calls) == 6
    again = blind_filter(load_config(None, overrides))
    assert again.data.train_path == str(out) and len(built) == 1  # reused: no model loaded, nothing asked
    assert blind_filter(cfg) is cfg  # flag off: untouched
    summary = json.loads(summary_path(out).read_text())
    summary_path(out).write_text(json.dumps({**summary, "errors": 1}))  # a run that could not ask everything
    blind_filter(load_config(None, overrides))
    assert len(built) == 2 and built[1].calls == []  # resumed: the model is loaded, answered questions not re-asked


def test_a_cached_blind_test_of_another_model_is_redone(tmp_path: Path, monkeypatch) -> None:
    """Retraining or replacing the checkpoint changes what it answers blind: the cached filter must not be reused."""
    from cacovid_cli.training import blind_filter
    from cacovid_rl.config import load_config
    from cacovid_rl.data.blind_test import blind_filtered_path, model_fingerprint
    from cacovid_rl.data.records import save_records
    from cacovid_rl.models import loading

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llava_onevision"}')
    (model / "model.safetensors").write_bytes(b"weights v1")
    train = tmp_path / "data" / "train.json"
    save_records(_records(tmp_path), train, video_root=tmp_path)
    built: list[FakeAdapter] = []
    monkeypatch.setattr(loading, "load_adapter", lambda cfg: built.append(FakeAdapter()) or built[-1])
    overrides = [f"data.train_path={train}", f"data.video_root={tmp_path}", "data.blind_filter=true"]
    overrides.append(f"model.path={model}")
    blind_filter(load_config(None, overrides))
    first = model_fingerprint(model)
    assert json.loads(summary_path(blind_filtered_path(train)).read_text())["model"] == first
    blind_filter(load_config(None, overrides))
    assert len(built) == 1  # same model: reused
    (model / "model.safetensors").write_bytes(b"weights v2, retrained")
    assert model_fingerprint(model) != first
    blind_filter(load_config(None, overrides))
    assert len(built) == 2 and len(built[1].calls) == 6  # another model: every question asked again
    assert json.loads(summary_path(blind_filtered_path(train)).read_text())["model"] == model_fingerprint(model)
