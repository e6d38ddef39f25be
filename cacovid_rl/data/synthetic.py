"""Synthetic "needle" video-QA: small H.264 videos whose answer lives in a few tokens chosen by the question.

Why this task (issue 4): the local debug mode must train a real policy in minutes on CPU, so the
data must make token selection matter and must need the question to do it.

Each video is ``num_frames`` frames of 64x64 pixels written at 1 fps (one frame per second, so the
"at most 1 frame per second" sampling rule keeps every frame). A frame is a 4x4 grid of 16x16-pixel
cells; with the shipped model's SigLIP patch 8 and LLaVA-OneVision's 2x pooling, one cell is exactly
one video token, so an object occupies whole tokens: ``OBJECT_SPAN`` tokens (one cell, visible in
``OBJECT_SPAN`` consecutive frames). A video therefore has ``num_frames * 16`` video tokens.

Two question kinds:
- ``multiple choice``, binding by position: 2-4 coloured objects (one per quadrant of the frame,
  distinct colours outside the prior quadrant) appear at different times among grey distractors; the question names a
  quadrant and asks the colour of the object there ("What colour is the object in the top left ?",
  options A-D fixed as red/green/blue/yellow). Every video has at least two coloured objects, so
  finding the coloured things is not enough: the question decides which one matters. The asked
  object holds 2 of the 128 tokens; a random 10% keeps one of them about 19% of the time, a
  question-aware selection always can.
- ``numerical``, counting: "How many red objects appear ?" (answer 0-3) among objects of other
  colours and grey ones; the oracle tokens are every counted object's.
- A learnable prior for the blind test: a coloured object in the bottom-right quadrant is always
  yellow, so "What colour is the object in the bottom right ?" is answerable without the video.

Why position and not shape: with patch-local features of silhouettes that differ only at their
edges (circle, square, triangle, diamond), the features are dominated by colour (two objects of one
colour looked far more alike at initialisation than one shape in two colours: cosine 0.57 vs
-0.02), and a tiny model stayed at the "average the coloured objects" solution for 500 steps. The
quadrant is a colour-independent key (the vision tower's position embedding, the token's place in
the sequence). Shapes remain for visual variety.

Records use the CaCoVID filtered schema (``problem`` with options, ``solution``, ``problem_type``,
``modality_type``, relative ``video``) plus ``problem_id``, ``options``, ``data_source`` and a
``meta`` block with the scene and the oracle tokens (flat indices into the ``T*16`` video tokens
that hold the answer), which tests and reports use for oracle selection.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FRAME_SIZE = 64
CELL = 16
GRID = FRAME_SIZE // CELL  # 4x4 cells = 4x4 pooled tokens per frame
TOKENS_PER_FRAME = GRID * GRID
NUM_FRAMES = 8
FPS = 1
OBJECT_SPAN = 2
"""Consecutive frames an object stays visible (fixed, so a count of objects is a count of tokens / span)."""

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
"""Object silhouettes: visual variety only; questions name objects by where they are, not by shape."""
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
"""Each quadrant is 2x2 cells; a video has at most one coloured object per quadrant."""
OPTION_COLOURS = ("red", "green", "blue", "yellow")
"""Options of every colour question, in this fixed order (A-D)."""
LETTERS = "ABCD"
PRIOR_QUADRANT = "bottom right"
PRIOR_COLOUR = "yellow"
"""The blind prior: a coloured object in the bottom-right quadrant is always yellow."""
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (230, 210, 40),
    "grey": (128, 128, 128),
}
BACKGROUND = (16, 16, 16)
COLOUR_JITTER = 12
MAX_COUNT = 3

COLOUR_QUESTION = "What colour is the object in the {quadrant} ?"
COUNT_QUESTION = "How many {colour} objects appear ?"
SPLITS = ("train", "val", "test")


def _shape_masks() -> dict[str, np.ndarray]:
    """Boolean 16x16 masks of every shape, centred in a cell (pixel centres at i + 0.5)."""
    y, x = np.mgrid[0:CELL, 0:CELL] + 0.5
    cx = cy = CELL / 2
    r = np.hypot(x - cx, y - cy)
    return {
        "circle": r <= 6.5,
        "square": (np.abs(x - cx) <= 5) & (np.abs(y - cy) <= 5),
        "triangle": (y >= 2) & (y <= 14) & (np.abs(x - cx) <= (y - 2) / 12 * 6.5),
        "cross": ((np.abs(x - cx) <= 2) & (np.abs(y - cy) <= 6.5)) | ((np.abs(y - cy) <= 2) & (np.abs(x - cx) <= 6.5)),
        "diamond": np.abs(x - cx) + np.abs(y - cy) <= 7,
        "ring": (r <= 6.5) & (r >= 3.5),
    }


def quadrant_cells(quadrant: str) -> list[int]:
    """Flat cell indices (row * GRID + col) of a quadrant."""
    q = QUADRANTS.index(quadrant)
    r0, c0 = (q // 2) * GRID // 2, (q % 2) * GRID // 2
    return [(r0 + dr) * GRID + c0 + dc for dr in range(GRID // 2) for dc in range(GRID // 2)]


def cell_quadrant(row: int, col: int) -> str:
    return QUADRANTS[(row // (GRID // 2)) * 2 + col // (GRID // 2)]


SHAPE_MASKS = _shape_masks()


@dataclass(frozen=True)
class SceneObject:
    """One object: a shape of a colour in one cell, visible in frames ``start .. start + span - 1``."""

    shape: str
    colour: str
    row: int
    col: int
    start: int
    rgb: tuple[int, int, int]
    span: int = OBJECT_SPAN

    def frames(self) -> range:
        return range(self.start, self.start + self.span)

    def token_indices(self) -> list[int]:
        """Flat indices into the ``[T * 16]`` video tokens covering this object."""
        return [t * TOKENS_PER_FRAME + self.row * GRID + self.col for t in self.frames()]


@dataclass(frozen=True)
class Scene:
    """A video's objects and its question."""

    objects: tuple[SceneObject, ...]
    problem_type: str
    question: str
    answer: str
    target: tuple[int, ...]
    """Indices into ``objects`` that the answer depends on (the asked object, or every counted one)."""
    prior: bool
    """True when the answer follows from the question alone (the dot is always yellow)."""
    num_frames: int = NUM_FRAMES


def render_frames(scene: Scene) -> np.ndarray:
    """The scene's frames as ``[T, 64, 64, 3]`` uint8 RGB."""
    frames = np.empty((scene.num_frames, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for obj in scene.objects:
        mask = SHAPE_MASKS[obj.shape]
        for t in obj.frames():
            cell = frames[t, obj.row * CELL : (obj.row + 1) * CELL, obj.col * CELL : (obj.col + 1) * CELL]
            cell[mask] = obj.rgb
    return frames


def options() -> list[str]:
    return [f"{letter}. {colour}" for letter, colour in zip(LETTERS, OPTION_COLOURS, strict=True)]


def problem_text(scene: Scene) -> str:
    """The ``problem`` field: the question, plus the options for multiple choice (CaCoVID schema)."""
    if scene.problem_type == "multiple choice":
        return scene.question + "\nOptions:\n" + "\n".join(options())
    return scene.question


def oracle_tokens(scene: Scene) -> list[int]:
    """Sorted flat video-token indices holding the answer (empty for a count of zero)."""
    return sorted({i for k in scene.target for i in scene.objects[k].token_indices()})


def _jitter(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.array(RGB[colour])
    return tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))


def _place(
    rng: np.random.Generator,
    specs: Sequence[tuple[str, str, Sequence[int]]],
    num_frames: int,
    span: int = OBJECT_SPAN,
) -> tuple[SceneObject, ...]:
    """Put each ``(shape, colour, allowed cells)`` in a free allowed cell, with a random start frame."""
    used: set[int] = set()
    objects = []
    for shape, colour, allowed in specs:
        free = [c for c in allowed if c not in used]
        cell = free[int(rng.integers(0, len(free)))]
        used.add(cell)
        start = int(rng.integers(0, num_frames - span + 1))
        objects.append(SceneObject(shape, colour, cell // GRID, cell % GRID, start, _jitter(rng, colour), span))
    return tuple(objects)


def _shape(rng: np.random.Generator) -> str:
    return SHAPES[int(rng.integers(0, len(SHAPES)))]


ALL_CELLS = tuple(range(GRID * GRID))
NON_PRIOR_CELLS = tuple(c for c in ALL_CELLS if c not in quadrant_cells(PRIOR_QUADRANT))


def colour_scene(
    rng: np.random.Generator,
    min_objects: int = 2,
    max_objects: int = 4,
    min_grey: int = 2,
    max_grey: int = 4,
    num_frames: int = NUM_FRAMES,
    span: int = OBJECT_SPAN,
) -> Scene:
    """A binding question: coloured objects in distinct quadrants; ask the colour of the one in a named quadrant.

    ``span`` (frames each object stays visible) other than ``OBJECT_SPAN`` is for training curricula only.
    """
    n = int(rng.integers(min_objects, max_objects + 1))
    quads = [QUADRANTS[int(i)] for i in rng.choice(len(QUADRANTS), size=n, replace=False)]
    # Distinct colours outside the prior quadrant (yellow included, so it is no rarer there).
    picked = iter(OPTION_COLOURS[int(i)] for i in rng.choice(len(OPTION_COLOURS), size=n, replace=False))
    colours = [PRIOR_COLOUR if q == PRIOR_QUADRANT else next(picked) for q in quads]
    specs: list[tuple[str, str, Sequence[int]]] = [
        (_shape(rng), c, quadrant_cells(q)) for q, c in zip(quads, colours, strict=True)
    ]
    specs += [(_shape(rng), "grey", ALL_CELLS) for _ in range(int(rng.integers(min_grey, max_grey + 1)))]
    objects = _place(rng, specs, num_frames, span)
    k = int(rng.integers(0, n))
    answer = LETTERS[OPTION_COLOURS.index(colours[k])]
    question = COLOUR_QUESTION.format(quadrant=quads[k])
    return Scene(objects, "multiple choice", question, answer, (k,), quads[k] == PRIOR_QUADRANT, num_frames)


def count_scene(
    rng: np.random.Generator,
    min_others: int = 2,
    max_others: int = 4,
    num_frames: int = NUM_FRAMES,
    span: int = OBJECT_SPAN,
) -> Scene:
    """A counting question: 0-3 objects of the asked colour among objects of other colours and grey ones.

    Non-yellow coloured objects stay out of the prior quadrant, so the prior holds in every video.
    """
    colour = OPTION_COLOURS[int(rng.integers(0, len(OPTION_COLOURS)))]
    count = int(rng.integers(0, MAX_COUNT + 1))
    others = [c for c in OPTION_COLOURS if c != colour]
    n_other = int(rng.integers(min_others, max_others + 1))
    other_colours = [
        others[int(rng.integers(0, len(others)))] if rng.random() < 0.5 else "grey" for _ in range(n_other)
    ]
    # Every video has at least two coloured (salient) objects competing for the budget.
    for i in range(n_other):
        if count + sum(c != "grey" for c in other_colours) >= 2:
            break
        other_colours[i] = others[int(rng.integers(0, len(others)))]
    cells = lambda c: ALL_CELLS if c in (PRIOR_COLOUR, "grey") else NON_PRIOR_CELLS  # noqa: E731
    specs = [(_shape(rng), colour, cells(colour)) for _ in range(count)]
    specs += [(_shape(rng), c, cells(c)) for c in other_colours]
    objects = _place(rng, specs, num_frames, span)
    question = COUNT_QUESTION.format(colour=colour)
    return Scene(objects, "numerical", question, str(count), tuple(range(count)), False, num_frames)


def sample_scene(
    rng: np.random.Generator,
    count_fraction: float = 0.25,
    min_objects: int = 2,
    max_objects: int = 4,
    num_frames: int = NUM_FRAMES,
    span: int = OBJECT_SPAN,
) -> Scene:
    """One scene: a counting question with probability ``count_fraction``, else a colour (binding) question."""
    if rng.random() < count_fraction:
        return count_scene(rng, num_frames=num_frames, span=span)
    return colour_scene(rng, min_objects=min_objects, max_objects=max_objects, num_frames=num_frames, span=span)


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = FPS) -> None:
    """Write ``[T, H, W, 3]`` uint8 RGB frames as an H.264 mp4 (near-lossless, no B-frames, single-threaded).

    Single-threaded x264 with fixed settings makes the bytes a function of the frames, so the same
    seed gives byte-identical files.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = int(frames.shape[2])
        stream.height = int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "preset": "medium", "x264-params": "bframes=0:threads=1"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def scene_record(scene: Scene, sample_id: str, video_rel: str) -> dict[str, Any]:
    """The JSON record of a scene (CaCoVID schema plus ``options``, ``problem_id``, ``data_source``, ``meta``)."""
    mc = scene.problem_type == "multiple choice"
    return {
        "problem_id": sample_id,
        "problem": problem_text(scene),
        "solution": f"<answer>{scene.answer}</answer>",
        "problem_type": scene.problem_type,
        "modality_type": "video",
        "video": video_rel,
        "options": options() if mc else [],
        "data_source": "synthetic/" + ("colour-prior" if scene.prior else "colour" if mc else "count"),
        "meta": {
            "question": scene.question,
            "prior": scene.prior,
            "num_frames": scene.num_frames,
            "tokens_per_frame": TOKENS_PER_FRAME,
            "oracle_tokens": oracle_tokens(scene),
            "objects": [{k: v for k, v in asdict(o).items() if k != "rgb"} for o in scene.objects],
            "target": list(scene.target),
        },
    }


def split_sizes(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, int]:
    """Split ``n`` records into train/val/test counts (val and test at least 1 each when n >= 3)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three numbers summing to 1, got {fractions}")
    val = round(n * fractions[1])
    test = round(n * fractions[2])
    if n >= 3:
        val, test = max(val, 1), max(test, 1)
    return {"train": n - val - test, "val": val, "test": test}


def make_synthetic(
    out_dir: str | Path,
    n: int = 2000,
    seed: int = 0,
    num_frames: int = NUM_FRAMES,
    count_fraction: float = 0.25,
    min_objects: int = 2,
    max_objects: int = 4,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    progress: bool = False,
) -> dict[str, Path]:
    """Generate ``n`` synthetic video-QA samples under ``out_dir``: ``videos/*.mp4`` and ``train/val/test.json``.

    Reproducible: the same arguments give identical JSON and byte-identical videos. Each sample
    draws from its own ``numpy`` generator seeded by ``(seed, index)``, so sample ``i`` does not
    depend on ``n``. Returns the paths of the split files. Also writes ``synthetic.json`` with the
    generation arguments.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if num_frames < OBJECT_SPAN:
        raise ValueError(f"num_frames must be >= {OBJECT_SPAN}, got {num_frames}")
    if not 1 <= min_objects <= max_objects <= len(OPTION_COLOURS):
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(OPTION_COLOURS)}")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    sizes = split_sizes(n, fractions)
    names = [s for s in SPLITS for _ in range(sizes[s])]
    records: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="make-synthetic", unit="video")
    for i in indices:
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, count_fraction, min_objects, max_objects, num_frames)
        rel = f"videos/{names[i]}_{i:06d}.mp4"
        write_mp4(render_frames(scene), out / rel)
        records[names[i]].append(scene_record(scene, f"synthetic-{seed}-{i:06d}", rel))
    paths = {}
    for split in SPLITS:
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(records[split], indent=1) + "\n")
    args = {
        "n": n,
        "seed": seed,
        "num_frames": num_frames,
        "count_fraction": count_fraction,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "fractions": list(fractions),
        "fps": FPS,
        "frame_size": FRAME_SIZE,
        "splits": sizes,
    }
    (out / "synthetic.json").write_text(json.dumps(args, indent=1) + "\n")
    return paths


def vocabulary() -> list[str]:
    """Every word of the synthetic questions, options and answers (the tiny model adds the instructions' words)."""
    words: list[str] = ["What", "colour", "is", "the", "object", "in", "How", "many", "objects", "appear", "Options"]
    words += [w for q in QUADRANTS for w in q.split()] + list(OPTION_COLOURS) + list(LETTERS)
    words += [str(i) for i in range(MAX_COUNT + 1)]
    return list(dict.fromkeys(words))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=2000, help="number of samples over all splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-frames", type=int, default=NUM_FRAMES)
    args = parser.parse_args(argv)
    paths = make_synthetic(args.out, n=args.n, seed=args.seed, num_frames=args.num_frames, progress=True)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
