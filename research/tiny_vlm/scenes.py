"""Curriculum scenes: easier versions of the synthetic boxes task, rendered in memory (no mp4 round trip).

The real task (``cacovid_rl.data.synthetic``) puts the answer in one of 128 video tokens among ~32 boxes. A
randomly initialised model never starts using the video on it; each stage below gives the answer a stronger
signal (more tokens, fewer distractors) until reading the named box works (docs/TINY_VLM.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from cacovid_rl.data import synthetic


@dataclass(frozen=True)
class Stage:
    """A curriculum stage: ``steps`` on in-memory scenes with ``min..max_per_frame`` boxes a frame.

    ``asked_span`` keeps the asked box visible that many consecutive frames (more tokens carry the
    answer: a strong signal while the video pathway starts working); ``numerical_fraction`` is the
    share of dot-count questions; ``text_only`` allows the text-only batches during the stage.
    """

    steps: int
    min_per_frame: int
    max_per_frame: int
    asked_span: int = 1
    numerical_fraction: float = 0.3
    text_only: bool = True
    fill: bool = False
    """Show a copy of the asked box in every cell of every frame (the answer in all 128 tokens)."""
    max_boxes: int = 0
    """When > 0: instead of boxes per frame, ``min_boxes..max_boxes`` boxes in the whole video, each
    visible ``box_span`` consecutive frames (few, long-lived boxes: binding with a strong signal)."""
    min_boxes: int = 2
    box_span: int = 8
    fill_boxes: int = 0
    """When > 0: every cell of every frame shows one of this many boxes (distinct colours, picked at
    random per cell): the asked box holds about 1/n of all 128 tokens (binding with little background)."""


def fill_with_asked_box(scene: synthetic.Scene) -> synthetic.Scene:
    """The asked box copied into every cell of every frame (the same answer in every token)."""
    box = scene.objects[scene.target[0]]
    objects = tuple(
        dataclasses.replace(box, row=c // synthetic.GRID, col=c % synthetic.GRID, start=0, span=scene.num_frames)
        for c in range(synthetic.TOKENS_PER_FRAME)
    )
    return dataclasses.replace(scene, objects=objects, target=(0,))


def few_box_scene(rng: np.random.Generator, stage: Stage) -> synthetic.Scene:
    """``min_boxes..max_boxes`` boxes of distinct outer colours, each in its own cell and visible ``box_span``
    consecutive frames; the question names the first."""
    n = int(rng.integers(stage.min_boxes, stage.max_boxes + 1))
    colours = [synthetic.OUTER_COLOURS[int(i)] for i in rng.choice(len(synthetic.OUTER_COLOURS), n, replace=False)]
    cells = rng.choice(synthetic.TOKENS_PER_FRAME, n, replace=False)
    t = synthetic.NUM_FRAMES
    boxes = tuple(
        synthetic.make_box(rng, c, int(cell), int(rng.integers(0, t - stage.box_span + 1)), stage.box_span)
        for c, cell in zip(colours, cells, strict=True)
    )
    return synthetic.ask(rng, boxes, stage.numerical_fraction, t)


def tiled_scene(rng: np.random.Generator, stage: Stage) -> synthetic.Scene:
    """``fill_boxes`` boxes of distinct colours tiled at random over every cell of every frame."""
    t, n = synthetic.NUM_FRAMES, stage.fill_boxes
    colours = [synthetic.OUTER_COLOURS[int(i)] for i in rng.choice(len(synthetic.OUTER_COLOURS), n, replace=False)]
    protos = [synthetic.make_box(rng, c, 0, 0, 1) for c in colours]
    owner = rng.integers(0, n, size=(t, synthetic.TOKENS_PER_FRAME))
    owner.flat[int(rng.integers(0, owner.size))] = 0  # the asked box appears at least once
    copies = [
        dataclasses.replace(protos[int(owner[f, c])], row=c // synthetic.GRID, col=c % synthetic.GRID, start=f)
        for f in range(t)
        for c in range(synthetic.TOKENS_PER_FRAME)
    ]
    first = next(i for i, b in enumerate(copies) if b.outer == colours[0])
    copies.insert(0, copies.pop(first))
    return synthetic.ask(rng, tuple(copies), stage.numerical_fraction, t)


def stage_scene(rng: np.random.Generator, stage: Stage) -> synthetic.Scene:
    """One scene of ``stage``."""
    if stage.fill_boxes > 0:
        scene = tiled_scene(rng, stage)
    elif stage.max_boxes > 0:
        scene = few_box_scene(rng, stage)
    else:
        scene = synthetic.sample_scene(
            rng, stage.numerical_fraction, stage.min_per_frame, stage.max_per_frame, asked_span=stage.asked_span
        )
    return fill_with_asked_box(scene) if stage.fill else scene


def stage_scenes(n: int, seed: int, stage: Stage) -> tuple[list[synthetic.Scene], list[np.ndarray]]:
    """``n`` scenes of ``stage`` and their rendered frames; scene ``i`` depends only on ``(seed, i)``."""
    scenes = [stage_scene(np.random.default_rng([seed, 7919, i]), stage) for i in range(n)]
    return scenes, [synthetic.render_frames(s) for s in scenes]
