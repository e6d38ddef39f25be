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
            assert r.video.is_file() and r.answer in (*"ABCD", "0", "1", "2", "3")
    assert set(types) == {"multiple choice", "numerical"}


def test_videos_decode_into_the_rendered_frames(dataset: Path) -> None:
    raw = json.loads((dataset / "train.json").read_text())
    for i in range(4):
        frames = read_frames(dataset / raw[i]["video"], num_frames=S.NUM_FRAMES)
        expected = S.render_frames(_scene(i))
        assert frames.shape == expected.shape == (S.NUM_FRAMES, 64, 64, 3)
        err = np.abs(frames.astype(int) - expected.astype(int))
        assert err.mean() < 3, err.mean()
        # every object still shows its colour after H.264: its nearest palette colour is its own
        palette = {name: np.array(rgb) for name, rgb in S.RGB.items()}
        for obj in _scene(i).objects:
            for t in obj.frames():
                cell = frames[t, obj.row * 16 : obj.row * 16 + 16, obj.col * 16 : obj.col * 16 + 16]
                mean = cell[S.SHAPE_MASKS[obj.shape]].mean(0)
                assert min(palette, key=lambda c: np.abs(palette[c] - mean).sum()) == obj.colour


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
        coloured = [o for o in scene.objects if o.colour != "grey"]
        assert len(coloured) >= 2, "every video has at least two salient objects competing"
        cells = {(o.row, o.col) for o in scene.objects}
        assert len(cells) == len(scene.objects)
        for o in coloured:  # the blind prior holds in every video
            if S.cell_quadrant(o.row, o.col) == S.PRIOR_QUADRANT:
                assert o.colour == S.PRIOR_COLOUR
        if scene.problem_type == "multiple choice":
            (k,) = scene.target
            asked = scene.objects[k]
            quadrant = S.cell_quadrant(asked.row, asked.col)
            assert scene.question == f"What colour is the object in the {quadrant} ?"
            in_quadrant = [o for o in coloured if S.cell_quadrant(o.row, o.col) == quadrant]
            assert in_quadrant == [asked], "the question names exactly one coloured object"
            assert scene.answer == "ABCD"[S.OPTION_COLOURS.index(asked.colour)]
            assert scene.prior == (quadrant == S.PRIOR_QUADRANT)
            assert len(S.oracle_tokens(scene)) == S.OBJECT_SPAN
        else:
            colour = scene.question.split()[2]
            assert int(scene.answer) == sum(o.colour == colour for o in scene.objects)
            assert len(S.oracle_tokens(scene)) == S.OBJECT_SPAN * int(scene.answer)


def test_question_mix_and_prior_share() -> None:
    scenes = [_scene(i, seed=5) for i in range(600)]
    kinds = Counter("count" if s.problem_type == "numerical" else "prior" if s.prior else "colour" for s in scenes)
    assert 0.18 < kinds["count"] / 600 < 0.32
    assert 0.1 < kinds["prior"] / 600 < 0.3  # something real for the blind test to drop
    answers = Counter(s.answer for s in scenes if s.problem_type == "multiple choice" and not s.prior)
    # no colour prior outside the prior quadrant
    assert min(answers[c] for c in "ABCD") > 0.18 * sum(answers.values())
    counts = Counter(s.answer for s in scenes if s.problem_type == "numerical")
    assert set(counts) == {"0", "1", "2", "3"}


def test_oracle_tokens_point_at_the_object() -> None:
    scene = _scene(0)
    frames = S.render_frames(scene)
    for tok in S.oracle_tokens(scene):
        t, cell = divmod(tok, S.TOKENS_PER_FRAME)
        r, c = divmod(cell, S.GRID)
        patch = frames[t, r * 16 : r * 16 + 16, c * 16 : c * 16 + 16]
        assert (patch != S.BACKGROUND).any()
