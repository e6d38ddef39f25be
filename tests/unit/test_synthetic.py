"""Synthetic needle video-QA: real mp4s that decode to the rendered frames, loader-compatible, reproducible."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cacovid_rl.data import synthetic as S
from cacovid_rl.data.records import load_records
from cacovid_rl.data.video import read_frames


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    S.make_synthetic(out, n=60, seed=3)
    return out


def _scene(i: int, seed: int = 3) -> S.Scene:
    return S.sample_scene(np.random.default_rng([seed, i]))


def test_splits_load_with_the_loader(dataset: Path) -> None:
    sizes = json.loads((dataset / "synthetic.json").read_text())["splits"]
    assert sizes == {"train": 48, "val": 6, "test": 6}
    types = Counter()
    for split, n in sizes.items():
        report = load_records(dataset / f"{split}.json", dataset)
        assert len(report.records) == n and report.errors == []
        types.update(r.problem_type for r in report.records)
        for r in report.records:
            assert r.video.is_file() and r.answer in (*"ABCD", "1", "2", "3", "4")
    assert set(types) == {"multiple choice", "numerical"}


PALETTE = {name: np.array(rgb) for name, rgb in S.RGB.items()}


def nearest(rgb: np.ndarray) -> str:
    """The palette colour closest to ``rgb`` (L1)."""
    return min(PALETTE, key=lambda c: np.abs(PALETTE[c] - rgb).sum())


def test_videos_decode_into_the_rendered_frames(dataset: Path) -> None:
    raw = json.loads((dataset / "train.json").read_text())
    for i in range(4):
        frames = read_frames(dataset / raw[i]["video"], num_frames=S.NUM_FRAMES)
        expected = S.render_frames(_scene(i))
        assert frames.shape == expected.shape == (S.NUM_FRAMES, 64, 64, 3)
        err = np.abs(frames.astype(int) - expected.astype(int))
        # yuv420p halves chroma resolution, so the many colour edges of ~30 boxes blur a little
        assert err.mean() < 5, err.mean()
        # every box still shows its colours after H.264: the nearest palette colour of its frame and of
        # each dot's centre is its own, and empty dot slots stay background
        for obj in _scene(i).objects:
            for t in obj.frames():
                cell = frames[t, obj.row * 16 : obj.row * 16 + 16, obj.col * 16 : obj.col * 16 + 16].astype(float)
                assert nearest(cell[0, 4:12].mean(0)) == obj.outer
                for slot, (y, x) in enumerate(S.DOT_SLOTS):
                    centre = cell[y + 1 : y + 3, x + 1 : x + 3].reshape(-1, 3).mean(0)
                    if slot in obj.dots:
                        assert nearest(centre) == obj.inner
                    else:
                        assert np.abs(centre - S.BACKGROUND).max() < 24


def test_reproducible_under_the_seed(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    S.make_synthetic(again, n=60, seed=3)
    for split in S.SPLITS:
        assert (again / f"{split}.json").read_text() == (dataset / f"{split}.json").read_text()
    raw = json.loads((dataset / "test.json").read_text())
    for r in raw:
        digest = [hashlib.sha256((d / r["video"]).read_bytes()).hexdigest() for d in (dataset, again)]
        assert digest[0] == digest[1]
    other = tmp_path / "other"
    S.make_synthetic(other, n=6, seed=4)
    assert (other / "train.json").read_text() != (dataset / "train.json").read_text()


def test_scene_invariants() -> None:
    for i in range(300):
        scene = _scene(i, seed=11)
        per_frame = Counter(t for o in scene.objects for t in o.frames())
        assert all(3 <= per_frame[t] <= 5 for t in range(S.NUM_FRAMES)), "every frame has 3-5 salient boxes"
        cells = [(t, o.row, o.col) for o in scene.objects for t in o.frames()]
        assert len(set(cells)) == len(cells), "one box per cell and frame"
        for o in scene.objects:
            assert 1 <= len(o.dots) <= S.MAX_DOTS and len(set(o.dots)) == len(o.dots)
        (k,) = scene.target
        asked = scene.objects[k]
        assert [o for o in scene.objects if o.outer == asked.outer] == [asked], "the question names one box"
        assert f" {asked.outer} box " in scene.question
        prior_answer = asked.inner == S.PRIOR_INNER if scene.problem_type == "multiple choice" else len(asked.dots) == 1
        assert scene.prior == (asked.outer == S.PRIOR_OUTER and prior_answer)
        assert S.oracle_tokens(scene) == asked.token_indices() and len(asked.token_indices()) == 1
        if scene.problem_type == "multiple choice":
            assert scene.question == f"What colour are the dots in the {asked.outer} box ?"
            assert scene.answer == "ABCD"[S.OPTION_COLOURS.index(asked.inner)]
        else:
            assert scene.question == f"How many dots are in the {asked.outer} box ?"
            assert int(scene.answer) == len(asked.dots)


def test_question_mix_and_prior_share() -> None:
    scenes = [_scene(i, seed=5) for i in range(900)]
    kinds = Counter("prior" if s.prior else "dots" if s.problem_type == "numerical" else "colour" for s in scenes)
    assert 0.2 < kinds["dots"] / 900 < 0.34
    assert 0.05 < kinds["prior"] / 900 < 0.13  # something real for the blind test to drop
    # ... but the prior only usually holds: white boxes with other dots exist (the blind test keeps those questions)
    white = [o for s in scenes for o in s.objects if o.outer == S.PRIOR_OUTER]
    follows = sum((o.inner, len(o.dots)) == (S.PRIOR_INNER, S.PRIOR_DOTS) for o in white) / len(white)
    assert 0.45 < follows < 0.65, follows  # PRIOR_PROB 0.5, plus random dots that happen to match (1/16)
    asked_white = [s for s in scenes if s.objects[s.target[0]].outer == S.PRIOR_OUTER]
    assert 0.2 < sum(not s.prior for s in asked_white) / len(asked_white) < 0.55
    # no answer prior outside the white box
    answers = Counter(s.answer for s in scenes if s.problem_type == "multiple choice" and not s.prior)
    assert min(answers[c] for c in "ABCD") > 0.18 * sum(answers.values())
    counts = Counter(s.answer for s in scenes if s.problem_type == "numerical" and not s.prior)
    assert set(counts) == {"1", "2", "3", "4"} and min(counts.values()) > 0.15 * sum(counts.values())


def test_records_round_trip_into_scenes(dataset: Path) -> None:
    raw = json.loads((dataset / "train.json").read_text())
    for i, record in enumerate(raw[:10]):
        original = _scene(i)
        rebuilt = S.scene_from_record(record)
        strip = lambda s: [(o.outer, o.inner, o.dots, o.row, o.col, o.start, o.span) for o in s.objects]  # noqa: E731
        assert strip(rebuilt) == strip(original)
        assert (rebuilt.question, rebuilt.answer, rebuilt.target, rebuilt.prior) == (
            original.question,
            original.answer,
            original.target,
            original.prior,
        )


def test_curriculum_options_are_checked() -> None:
    rng = np.random.default_rng(0)
    only = S.sample_scene(rng, min_per_frame=0, max_per_frame=0, asked_span=8)
    assert len(only.objects) == 1 and len(S.oracle_tokens(only)) == 8
    with pytest.raises(ValueError, match="asked_span"):
        S.sample_scene(rng, asked_span=9)
    with pytest.raises(ValueError, match="per_frame"):
        S.sample_scene(rng, min_per_frame=4, max_per_frame=2)


def test_oracle_tokens_point_at_the_object() -> None:
    scene = _scene(0)
    frames = S.render_frames(scene)
    for tok in S.oracle_tokens(scene):
        t, cell = divmod(tok, S.TOKENS_PER_FRAME)
        r, c = divmod(cell, S.GRID)
        patch = frames[t, r * 16 : r * 16 + 16, c * 16 : c * 16 + 16]
        assert (patch != S.BACKGROUND).any()
