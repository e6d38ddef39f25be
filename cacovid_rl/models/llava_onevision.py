"""Adapter over transformers' unmodified ``LlavaOnevisionForConditionalGeneration``.

``T`` is the number of frames and ``N`` the pooled tokens per frame (``ceil(h/2) * ceil(w/2)`` for an
``h x w`` patch grid: 14 x 14 = 196 for the 7B at 384 px). ``get_video_features`` appends one
``image_newline`` after the whole video; it stays in the sequence right after the video block and is
never scored or pruned. Positions are plain ``0..L-1``. Frames become pixels through the checkpoint's
own ``LlavaOnevisionVideoProcessor`` (``preprocessing.py``). Compressed blocks (``generate_compressed``) replace
the ``T*N`` video tokens only: a merged token sits at its representative token's 1-D position, and the
``image_newline`` still follows the block.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.video_processing_utils import BaseVideoProcessor

from cacovid_rl.models.base import VideoLLMAdapter
from cacovid_rl.models.preprocessing import default_video_processor, process_video
from cacovid_rl.types import EncodedQuestion


class LlavaOnevisionAdapter(VideoLLMAdapter):
    family = "llava_onevision"

    def __init__(
        self,
        model: LlavaOnevisionForConditionalGeneration,
        tokenizer: Any,
        video_processor: BaseVideoProcessor | None = None,
        processor: Any | None = None,
        **kwargs: Any,
    ) -> None:
        """``video_processor``: the checkpoint's transformers video processor (``None``: the class defaults
        sized for the vision tower, for models built in memory)."""
        if not isinstance(model, LlavaOnevisionForConditionalGeneration):
            raise TypeError(f"LlavaOnevisionAdapter needs a LlavaOnevisionForConditionalGeneration, got {type(model)}")
        if model.config.vision_feature_select_strategy != "full":
            # SigLIP has no CLS token: "default" would silently drop a real patch.
            raise ValueError(
                "LLaVA-OneVision with a SigLIP tower needs vision_feature_select_strategy='full', "
                f"got {model.config.vision_feature_select_strategy!r}"
            )
        vision = model.config.vision_config
        if video_processor is None:
            video_processor = default_video_processor(model.config)
        size = video_processor.size
        # Checked here, not at the first video: a processor that keeps the aspect ratio (shortest_edge) or
        # skips resizing would feed the tower a grid it cannot pool into T*N tokens.
        if not video_processor.do_resize or (size.height, size.width) != (vision.image_size, vision.image_size):
            raise ValueError(
                f"the video processor resizes to {dict(size)} (do_resize={video_processor.do_resize}) but the "
                f"vision tower expects {vision.image_size}x{vision.image_size}"
            )
        super().__init__(model, tokenizer, video_processor, processor, **kwargs)
        self.video_token_id = int(model.config.video_token_id)
        grid = vision.image_size // vision.patch_size
        self.tokens_per_frame = math.ceil(grid / 2) ** 2

    def text_positions(self, length: int) -> torch.Tensor:
        return torch.arange(length)

    @property
    def video_processor(self) -> BaseVideoProcessor:
        """The transformers video processor every video goes through."""
        return self.preprocessing

    def pixel_values(self, frames: np.ndarray) -> torch.Tensor:
        """``pixel_values_videos`` ``[1, T, 3, S, S]`` from the video processor, in the model's dtype and device."""
        return process_video(self.video_processor, frames)["pixel_values_videos"].to(self.device, self.dtype)

    def input_ids(self, prompt: str, num_frames: int) -> tuple[torch.Tensor, int]:
        """Prompt ids with the video placeholder expanded to ``T*N + 1`` tokens, and the block start."""
        ids = self.tokenize(self.render_prompt(prompt, with_video=True))
        count = num_frames * self.tokens_per_frame + 1  # + image_newline
        return self.expand_placeholder(ids, self.video_token_id, count)

    def native_inputs(self, frames: np.ndarray, prompt: str) -> dict[str, torch.Tensor]:
        """The inputs of the native ``model(**inputs)`` / ``model.generate(**inputs)`` path (tests, references)."""
        pixels = self.pixel_values(frames)
        ids, _ = self.input_ids(prompt, int(pixels.shape[1]))
        return {
            "input_ids": ids[None].to(self.device),
            "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long, device=self.device),
            "pixel_values_videos": pixels,
        }

    @torch.no_grad()
    def encode(self, frames: np.ndarray, prompt: str) -> EncodedQuestion:
        pixels = self.pixel_values(frames)
        num_frames = int(pixels.shape[1])
        features = self.model.model.get_video_features(pixels).pooler_output[0]  # [T*N + 1, D]
        if features.shape[0] != num_frames * self.tokens_per_frame + 1:
            raise RuntimeError(
                f"expected {num_frames} x {self.tokens_per_frame} + 1 video features, got {features.shape[0]}"
            )
        ids, start = self.input_ids(prompt, num_frames)
        ids = ids.to(self.device)
        embeds = self.model.get_input_embeddings()(ids)
        embeds[start : start + features.shape[0]] = features.to(embeds.dtype)
        return EncodedQuestion(
            inputs_embeds=embeds,
            position_ids=self.text_positions(ids.numel()).to(self.device),
            video_start=start,
            num_frames=num_frames,
            tokens_per_frame=self.tokens_per_frame,
            input_ids=ids,
        )
