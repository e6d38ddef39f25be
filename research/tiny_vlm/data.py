"""Scenes as tensors: frames decoded once into a uint8 cache, prompts tokenized once, training batches.

Prompts are rendered, tokenized and their video placeholder expanded by the library's adapter
(``LlavaOnevisionAdapter.input_ids``), and pixels come from its video processor
(``cacovid_rl.models.preprocessing``), so the recipe trains on exactly the inputs the RL loop feeds the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cacovid_rl.data import synthetic
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.models.llava_onevision import LlavaOnevisionAdapter
from cacovid_rl.models.preprocessing import process_video
from research.tiny_vlm.scenes import Stage, stage_scenes


@dataclass
class EncodedSet:
    """A split as tensors: frames ``[N,T,H,W,3]`` uint8, prompts (text and ids, with and without the video),
    answers (one token each), problem types, the asked box's tokens (``oracle``) and whether the blind prior
    answers the question."""

    frames: torch.Tensor
    prompts: list[str]
    prompt_ids: list[list[int]]
    text_only_ids: list[list[int]]
    answers: list[str]
    answer_ids: torch.Tensor
    problem_types: list[str]
    oracle: list[list[int]]
    prior: torch.Tensor
    boxes: list[list[int]] = field(default_factory=list)
    """Video tokens of every box in the video (the asked one included): padding a question-aware policy picks."""

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def _answer_id(adapter: LlavaOnevisionAdapter, answer: str) -> int:
    ids = adapter.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"answer {answer!r} is not a single token of the tiny vocabulary")
    return int(ids[0])


def encode_scenes(
    adapter: LlavaOnevisionAdapter, scenes: Sequence[synthetic.Scene], frames: Sequence[np.ndarray]
) -> EncodedSet:
    """Tokenize each scene's prompt once (video placeholder expanded) and stack its frames."""
    prompts = [build_prompt(synthetic.problem_text(s), s.problem_type) for s in scenes]
    num_frames = int(frames[0].shape[0])
    oracle, boxes = [], []
    for s in scenes:
        asked = s.objects[s.target[0]].outer  # every copy of the asked box (curriculum tilings have many)
        oracle.append(sorted({i for o in s.objects if o.outer == asked for i in o.token_indices()}))
        boxes.append(sorted({i for o in s.objects for i in o.token_indices()}))
    return EncodedSet(
        frames=torch.from_numpy(np.stack(frames)),
        prompts=prompts,
        prompt_ids=[adapter.input_ids(p, num_frames)[0].tolist() for p in prompts],
        text_only_ids=[adapter.tokenize(adapter.render_prompt(p, with_video=False)).tolist() for p in prompts],
        answers=[s.answer for s in scenes],
        answer_ids=torch.tensor([_answer_id(adapter, s.answer) for s in scenes]),
        problem_types=[s.problem_type for s in scenes],
        oracle=oracle,
        prior=torch.tensor([s.prior for s in scenes]),
        boxes=boxes,
    )


def scenes_from_records(path: str | Path) -> tuple[list[synthetic.Scene], list[Path]]:
    """Rebuild scenes (question, answer, boxes) and video paths from a synthetic split file."""
    raw = json.loads(Path(path).read_text())
    return [synthetic.scene_from_record(r) for r in raw], [Path(path).parent / r["video"] for r in raw]


def encode_split(adapter: LlavaOnevisionAdapter, path: str | Path) -> EncodedSet:
    """Decode every video of a synthetic split once (decord) and tokenize its prompts."""
    from cacovid_rl.data.video import read_frames

    scenes, videos = scenes_from_records(path)
    frames = [read_frames(v, scenes[i].num_frames) for i, v in enumerate(videos)]
    return encode_scenes(adapter, scenes, frames)


def encode_generated(adapter: LlavaOnevisionAdapter, n: int, seed: int, stage: Stage) -> EncodedSet:
    """``n`` in-memory scenes of a curriculum stage, encoded."""
    scenes, frames = stage_scenes(n, seed, stage)
    return encode_scenes(adapter, scenes, frames)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows: positions stay ``0..n-1`` exactly as for an unpadded sequence."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def pixel_values(adapter: LlavaOnevisionAdapter, frames: torch.Tensor) -> torch.Tensor:
    """``[B,T,H,W,3]`` uint8 -> ``[B,T,3,H,W]`` through the adapter's video processor (one call for all frames:
    the processor treats every frame alike)."""
    b, t = frames.shape[:2]
    flat = process_video(adapter.video_processor, frames.reshape(b * t, *frames.shape[2:]).numpy())
    pixels = flat["pixel_values_videos"][0]
    return pixels.view(b, t, *pixels.shape[1:])


def training_batch(
    adapter: LlavaOnevisionAdapter, data: EncodedSet, idx: Sequence[int], text_only: bool = False
) -> dict[str, torch.Tensor]:
    """Native-forward inputs with labels on the answer token and ``<|im_end|>`` only (so greedy answers stop)."""
    eos = int(adapter.tokenizer.eos_token_id)
    rows, labels = [], []
    for i in idx:
        ids = (data.text_only_ids if text_only else data.prompt_ids)[i]
        rows.append([*ids, int(data.answer_ids[i]), eos])
        labels.append([-100] * len(ids) + [int(data.answer_ids[i]), eos])
    input_ids, attention_mask = pad_right(rows, int(adapter.tokenizer.pad_token_id))
    label_t, _ = pad_right(labels, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_t}
    if not text_only:
        batch["pixel_values_videos"] = pixel_values(adapter, data.frames[list(idx)])
    return batch
