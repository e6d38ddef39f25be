"""Synthetic "needle" video-QA: small H.264 videos whose answer lives in the one token the question names.

Why this task (issues 4 and 7): the local debug mode must train a real policy in minutes on CPU, so
the data must make token selection matter, must need the question to do it, and must defeat the
question-agnostic pruners (saliency, diversity, uniform) for a reason a real video shares: many
salient things, one of which the question is about.

Each video is ``num_frames`` frames of 64x64 pixels written at 1 fps (one frame per second, so the
"at most 1 frame per second" sampling rule keeps every frame). A frame is a 4x4 grid of 16x16-pixel
cells; with the shipped model's SigLIP patch 8 and LLaVA-OneVision's 2x pooling one cell is exactly
one video token, so a video has ``num_frames * 16`` video tokens.

Objects are *boxes*: a 2-pixel square frame of an outer colour (7 colours) holding 1-4 dots of an
inner colour (red, green, blue or yellow), each dot in its own quarter of the box (its own SigLIP
patch). Every frame shows 3-5 boxes for one second each (about 32 boxes a video, all of them
colourful, so a saliency heuristic keeps a random few); exactly one box has the outer colour the
question names:
- ``multiple choice``: "What colour are the dots in the pink box ?" (options A-D fixed as
  red/green/blue/yellow);
- ``numerical``: "How many dots are in the pink box ?" (1-4).
The answer is in that box's single token. At 10% retention (12 of 128 tokens) no question-agnostic
selection can keep every box; a question-aware one needs one token.

Why boxes and this binding (what was tried: docs/TINY_VLM.md): the geometry of every box
is the same, so a box's patch features are close to a sum of an outer-colour part and a dots part.
The key (outer colour) and the answer (dots colour, dot count) are then separable directions that
a small LLM reads and a one-layer policy can match against the question's colour word. Binding by
position (an earlier version: "the object in the top left") failed there: object tokens carried
their colour but barely their position. The many distractors differ in outer colour, dot colour
and dot count (~100 kinds), so diversity-based pruning (DivPrune) cannot cover them all either.

A learnable prior for the blind test: a white box holds one yellow dot half of the time (otherwise
random dots, like any box), so a model learns to answer "yellow" / "1" for the white box without the
video, and is right on ~62% of the white-box questions (``Scene.prior``). Why not always (the previous
version): the blind test then dropped every white-box question from training, the policy never learned
to keep the white box, and on test questions about it the kept tokens misled the LLM away from the
answer it gives blind (31% of them lost at 10% retention; docs/report/README.md). With a prior that
only usually holds, the blind test keeps the white-box questions the prior gets wrong, as it would on
real data.

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
# Written to synthetic.json: the shipped tiny VLM was trained on this task, so data from an older generator
# (the quadrant task, no "task" key) must not be trained on silently (cacovid_cli.training.ensure_data refuses it).
TASK = "boxes-v3"

OUTER_COLOURS = ("orange", "cyan", "purple", "pink", "brown", "grey", "white")
"""Box colours: the key a question names. None of them is an option word, so the question's key word
appears once in the prompt (a one-layer policy cannot tell two equal words apart by their context)."""
OPTION_COLOURS = ("red", "green", "blue", "yellow")
"""Dot colours, and the options of every multiple-choice question in this fixed order (A-D)."""
LETTERS = "ABCD"
MAX_DOTS = 4
PRIOR_OUTER = "white"
PRIOR_INNER = "yellow"
PRIOR_DOTS = 1
PRIOR_PROB = 0.5
"""The blind prior: a white box holds one yellow dot with probability ``PRIOR_PROB``, else random dots."""
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (230, 210, 40),
    "orange": (245, 135, 20),
    "cyan": (40, 205, 215),
    "purple": (135, 55, 205),
    "pink": (240, 120, 200),
    "brown": (135, 80, 35),
    "grey": (130, 130, 130),
    "white": (240, 240, 240),
}
BACKGROUND = (16, 16, 16)
COLOUR_JITTER = 12
BORDER = 2
"""Width in pixels of a box's frame (even, so yuv420p chroma blocks never straddle two colours)."""
DOT_SLOTS = ((3, 3), (3, 9), (9, 3), (9, 9))
"""Top-left pixel of each 4x4 dot slot inside a cell: one slot per 8x8 SigLIP patch, 2 pixels apart."""

COLOUR_QUESTION = "What colour are the dots in the {colour} box ?"
COUNT_QUESTION = "How many dots are in the {colour} box ?"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SceneObject:
    """One box: outer colour, dot colour, occupied dot slots, its cell, and the frames it is visible in."""

    outer: str
    inner: str
    dots: tuple[int, ...]
    row: int
    col: int
    start: int
    span: int = 1
    outer_rgb: tuple[int, int, int] = (0, 0, 0)
    inner_rgb: tuple[int, int, int] = (0, 0, 0)

    def frames(self) -> range:
        return range(self.start, self.start + self.span)

    def token_indices(self) -> list[int]:
        """Flat indices into the ``[T * 16]`` video tokens covering this box."""
        return [t * TOKENS_PER_FRAME + self.row * GRID + self.col for t in self.frames()]


@dataclass(frozen=True)
class Scene:
    """A video's boxes and its question."""

    objects: tuple[SceneObject, ...]
    problem_type: str
    question: str
    answer: str
    target: tuple[int, ...]
    """Indices into ``objects`` that the answer depends on (the box the question names)."""
    prior: bool
    """True when the blind prior gives the answer: the white box is asked about and its dots are yellow (multiple
    choice) or one (numerical)."""
    num_frames: int = NUM_FRAMES


def render_frames(scene: Scene) -> np.ndarray:
    """The scene's frames as ``[T, 64, 64, 3]`` uint8 RGB."""
    frames = np.empty((scene.num_frames, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for obj in scene.objects:
        for t in obj.frames():
            cell = frames[t, obj.row * CELL : (obj.row + 1) * CELL, obj.col * CELL : (obj.col + 1) * CELL]
            cell[:BORDER] = obj.outer_rgb
            cell[-BORDER:] = obj.outer_rgb
            cell[:, :BORDER] = obj.outer_rgb
            cell[:, -BORDER:] = obj.outer_rgb
            for slot in obj.dots:
                y, x = DOT_SLOTS[slot]
                cell[y : y + 4, x : x + 4] = obj.inner_rgb
    return frames


def options() -> list[str]:
    return [f"{letter}. {colour}" for letter, colour in zip(LETTERS, OPTION_COLOURS, strict=True)]


def problem_text(scene: Scene) -> str:
    """The ``problem`` field: the question, plus the options for multiple choice (CaCoVID schema)."""
    if scene.problem_type == "multiple choice":
        return scene.question + "\nOptions:\n" + "\n".join(options())
    return scene.question


def oracle_tokens(scene: Scene) -> list[int]:
    """Sorted flat video-token indices holding the answer."""
    return sorted({i for k in scene.target for i in scene.objects[k].token_indices()})


def _jitter(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.array(RGB[colour])
    return tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))


def make_box(rng: np.random.Generator, outer: str, cell: int, start: int, span: int) -> SceneObject:
    """A box of ``outer`` colour with random dots (a white box: one yellow dot with probability ``PRIOR_PROB``)."""
    if outer == PRIOR_OUTER and rng.random() < PRIOR_PROB:
        inner, n = PRIOR_INNER, PRIOR_DOTS
    else:
        inner, n = OPTION_COLOURS[int(rng.integers(0, len(OPTION_COLOURS)))], int(rng.integers(1, MAX_DOTS + 1))
    dots = tuple(sorted(int(s) for s in rng.choice(len(DOT_SLOTS), size=n, replace=False)))
    return SceneObject(
        outer, inner, dots, cell // GRID, cell % GRID, start, span, _jitter(rng, outer), _jitter(rng, inner)
    )


def sample_scene(
    rng: np.random.Generator,
    numerical_fraction: float = 0.3,
    min_per_frame: int = 3,
    max_per_frame: int = 5,
    num_frames: int = NUM_FRAMES,
    asked_span: int = 1,
) -> Scene:
    """One scene: ``min..max_per_frame`` boxes in every frame, exactly one of the asked outer colour.

    The asked colour is uniform over ``OUTER_COLOURS`` (so about 1 in 7 questions is about the white
    box, whose blind prior holds ~62% of the time); the question is numerical with probability ``numerical_fraction``.
    ``asked_span`` > 1 (the asked box visible in that many consecutive frames) and small per-frame
    counts are for training curricula only.
    """
    if not 0 <= min_per_frame <= max_per_frame <= TOKENS_PER_FRAME - 1:
        raise ValueError(f"need 0 <= min_per_frame <= max_per_frame < {TOKENS_PER_FRAME}")
    if not 1 <= asked_span <= num_frames:
        raise ValueError(f"asked_span must be in 1..{num_frames}, got {asked_span}")
    asked = OUTER_COLOURS[int(rng.integers(0, len(OUTER_COLOURS)))]
    others = [c for c in OUTER_COLOURS if c != asked]
    start = int(rng.integers(0, num_frames - asked_span + 1))
    cell = int(rng.integers(0, TOKENS_PER_FRAME))
    objects = [make_box(rng, asked, cell, start, asked_span)]
    for t in range(num_frames):
        taken = {cell} if t in objects[0].frames() else set()
        n = int(rng.integers(min_per_frame, max_per_frame + 1)) - len(taken)
        free = [c for c in range(TOKENS_PER_FRAME) if c not in taken]
        for c in rng.choice(free, size=max(n, 0), replace=False):
            objects.append(make_box(rng, others[int(rng.integers(0, len(others)))], int(c), t, 1))
    return ask(rng, tuple(objects), numerical_fraction, num_frames)


def ask(rng: np.random.Generator, boxes: tuple[SceneObject, ...], numerical_fraction: float, num_frames: int) -> Scene:
    """The scene with a question about ``boxes[0]`` (numerical with probability ``numerical_fraction``)."""
    box = boxes[0]
    if rng.random() < numerical_fraction:
        problem_type, question, answer = "numerical", COUNT_QUESTION.format(colour=box.outer), str(len(box.dots))
    else:
        problem_type = "multiple choice"
        question = COLOUR_QUESTION.format(colour=box.outer)
        answer = LETTERS[OPTION_COLOURS.index(box.inner)]
    prior = box.outer == PRIOR_OUTER and (box.inner == PRIOR_INNER if problem_type == "multiple choice"
                                          else len(box.dots) == PRIOR_DOTS)  # fmt: skip
    return Scene(boxes, problem_type, question, answer, (0,), prior, num_frames)


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
    kind = "prior" if scene.prior else "colour" if mc else "dots"
    return {
        "problem_id": sample_id,
        "problem": problem_text(scene),
        "solution": f"<answer>{scene.answer}</answer>",
        "problem_type": scene.problem_type,
        "modality_type": "video",
        "video": video_rel,
        "options": options() if mc else [],
        "data_source": "synthetic/" + kind,
        "meta": {
            "question": scene.question,
            "prior": scene.prior,
            "num_frames": scene.num_frames,
            "tokens_per_frame": TOKENS_PER_FRAME,
            "oracle_tokens": oracle_tokens(scene),
            "objects": [
                {k: v for k, v in asdict(o).items() if not k.endswith("_rgb")} | {"dots": list(o.dots)}
                for o in scene.objects
            ],
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
    numerical_fraction: float = 0.3,
    min_per_frame: int = 3,
    max_per_frame: int = 5,
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
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not 0.0 <= numerical_fraction <= 1.0:
        raise ValueError(f"numerical_fraction must be in [0, 1], got {numerical_fraction}")
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
        scene = sample_scene(rng, numerical_fraction, min_per_frame, max_per_frame, num_frames)
        rel = f"videos/{names[i]}_{i:06d}.mp4"
        write_mp4(render_frames(scene), out / rel)
        records[names[i]].append(scene_record(scene, f"synthetic-{seed}-{i:06d}", rel))
    paths = {}
    for split in SPLITS:
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(records[split], indent=1) + "\n")
    args = {
        "task": TASK,
        "n": n,
        "seed": seed,
        "num_frames": num_frames,
        "numerical_fraction": numerical_fraction,
        "min_per_frame": min_per_frame,
        "max_per_frame": max_per_frame,
        "fractions": list(fractions),
        "fps": FPS,
        "frame_size": FRAME_SIZE,
        "splits": sizes,
    }
    (out / "synthetic.json").write_text(json.dumps(args, indent=1) + "\n")
    return paths


def scene_from_record(record: dict[str, Any]) -> Scene:
    """Rebuild a scene (boxes without their jittered RGB, question, answer) from its JSON record."""
    meta = record["meta"]
    objects = tuple(
        SceneObject(o["outer"], o["inner"], tuple(o["dots"]), o["row"], o["col"], o["start"], o.get("span", 1))
        for o in meta["objects"]
    )
    answer = record["solution"].removeprefix("<answer>").removesuffix("</answer>")
    return Scene(
        objects,
        record["problem_type"],
        meta["question"],
        answer,
        tuple(meta["target"]),
        meta["prior"],
        meta["num_frames"],
    )


def vocabulary() -> list[str]:
    """Every word of the synthetic questions, options and answers (the tiny model adds the instructions' words)."""
    words: list[str] = ["What", "colour", "are", "the", "dots", "in", "box", "How", "many", "Options"]
    words += list(OUTER_COLOURS) + list(OPTION_COLOURS) + list(LETTERS)
    words += [str(i) for i in range(MAX_DOTS + 1)]
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
