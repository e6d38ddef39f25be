"""Adapter over transformers' unmodified ``Qwen2_5_VLForConditionalGeneration``.

``T`` is the number of temporal groups (frames / ``temporal_patch_size``, the last group padded by
repeating the last frame) and ``N`` the merged tokens per group (``(h/2) * (w/2)`` for an ``h x w``
patch grid). Positions are 3-D M-RoPE ids ``[3, L]`` from the model's own ``get_rope_index`` (with
``mm_token_type_ids``: without them transformers silently falls back to 1-D positions). Pruning
gathers their columns; they are never recomputed. ``model.model.rope_deltas`` is reset around every
call so no state leaks from one question to the next. Frames become pixels through the checkpoint's own
``Qwen2VLVideoProcessor`` (``preprocessing.py``). Compressed blocks (``generate_compressed``) carry ``[3, K]``
M-RoPE ids: a merged token takes its representative token's (t, h, w) ids, so its temporal and spatial place in
the video is one of its members'.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.video_processing_utils import BaseVideoProcessor

from cacovid_rl.models.base import VideoLLMAdapter
from cacovid_rl.models.preprocessing import default_video_processor, process_video
from cacovid_rl.types import EncodedQuestion

VIDEO_TOKEN_TYPE = 2  # mm_token_type_ids: 0 text, 1 image, 2 video


class Qwen2_5VLAdapter(VideoLLMAdapter):
    family = "qwen2_5_vl"

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        tokenizer: Any,
        video_processor: BaseVideoProcessor | None = None,
        processor: Any | None = None,
        *,
        fps: float | None = None,
        **kwargs: Any,
    ) -> None:
        """``video_processor``: the checkpoint's transformers video processor (``None``: the class defaults with
        the vision tower's patch sizes). ``fps``: default frame rate of the sampled frames (sets the temporal
        position spacing, see ``encode``)."""
        if not isinstance(model, Qwen2_5_VLForConditionalGeneration):
            raise TypeError(f"Qwen2_5VLAdapter needs a Qwen2_5_VLForConditionalGeneration, got {type(model)}")
        vision = model.config.vision_config
        if video_processor is None:
            video_processor = default_video_processor(model.config)
        vp = video_processor
        if (vp.patch_size, vp.temporal_patch_size, vp.merge_size) != (
            vision.patch_size,
            vision.temporal_patch_size,
            vision.spatial_merge_size,
        ):
            raise ValueError(
                f"the video processor's patches (patch {vp.patch_size}, temporal {vp.temporal_patch_size}, merge "
                f"{vp.merge_size}) do not match the vision config (patch {vision.patch_size}, temporal "
                f"{vision.temporal_patch_size}, merge {vision.spatial_merge_size})"
            )
        super().__init__(model, tokenizer, video_processor, processor, **kwargs)
        self.video_token_id = int(model.config.video_token_id)
        self.merge_size = int(vision.spatial_merge_size)
        self.fps = fps

    def text_positions(self, length: int) -> torch.Tensor:
        return torch.arange(length).expand(3, length).clone()

    @property
    def video_processor(self) -> BaseVideoProcessor:
        """The transformers video processor every video goes through."""
        return self.preprocessing

    def pixel_values(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(``pixel_values_videos`` ``[P, C*tp*ps*ps]``, ``video_grid_thw`` ``[1, 3]``) from the video processor,
        on the model's device."""
        out = process_video(self.video_processor, frames)
        return out["pixel_values_videos"].to(self.device, self.dtype), out["video_grid_thw"].to(self.device)

    def second_per_grid(self, fps: float | None) -> torch.Tensor | None:
        """Seconds per temporal group, as the processor computes it (``temporal_patch_size / fps``)."""
        fps = self.fps if fps is None else fps
        if fps is None:
            return None  # get_rope_index then uses 1 s per group
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        return torch.tensor([self.video_processor.temporal_patch_size / fps], device=self.device)

    def native_inputs(self, frames: np.ndarray, prompt: str, fps: float | None = None) -> dict[str, torch.Tensor]:
        """The inputs of the native ``model(**inputs)`` / ``model.generate(**inputs)`` path (tests, references)."""
        pixels, grid = self.pixel_values(frames)
        t, h, w = (int(v) for v in grid[0])
        ids, start = self.expand_placeholder(
            self.tokenize(self.render_prompt(prompt, with_video=True)),
            self.video_token_id,
            t * h * w // self.merge_size**2,
        )
        mm = torch.zeros_like(ids)
        mm[start : start + t * h * w // self.merge_size**2] = VIDEO_TOKEN_TYPE
        inputs = {
            "input_ids": ids[None].to(self.device),
            "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long, device=self.device),
            "mm_token_type_ids": mm[None].to(self.device),
            "pixel_values_videos": pixels,
            "video_grid_thw": grid,
        }
        spg = self.second_per_grid(fps)
        if spg is not None:
            inputs["second_per_grid_ts"] = spg
        return inputs

    @torch.no_grad()
    def encode(self, frames: np.ndarray, prompt: str, fps: float | None = None) -> EncodedQuestion:
        """Encode frames sampled at ``fps`` frames per second (``None``: the adapter's default).

        The frame rate only sets the temporal spacing of the M-RoPE ids, exactly as the processor does.
        """
        inputs = self.native_inputs(frames, prompt, fps)
        grid = inputs["video_grid_thw"]
        t, h, w = (int(v) for v in grid[0])
        num_frames, per_frame = t, h * w // self.merge_size**2
        self.model.model.rope_deltas = None
        features = self.model.model.get_video_features(inputs["pixel_values_videos"], grid).pooler_output[0]
        ids, mm = inputs["input_ids"], inputs["mm_token_type_ids"]
        positions, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=mm, video_grid_thw=grid, second_per_grid_ts=inputs.get("second_per_grid_ts")
        )
        self.model.model.rope_deltas = None
        start = int((mm[0] == VIDEO_TOKEN_TYPE).nonzero()[0])
        embeds = self.model.get_input_embeddings()(ids[0])
        embeds[start : start + features.shape[0]] = features.to(embeds.dtype)
        return EncodedQuestion(
            inputs_embeds=embeds,
            position_ids=positions[:, 0],
            video_start=start,
            num_frames=num_frames,
            tokens_per_frame=per_frame,
            input_ids=ids[0],
        )
