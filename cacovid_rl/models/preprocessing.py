"""Video preprocessing: the checkpoint's own transformers video processor, called one way.

There is exactly one preprocessing path. Every adapter turns decoded frames into pixel inputs with
the transformers video processor of its checkpoint (``LlavaOnevisionVideoProcessor``,
``Qwen2VLVideoProcessor``: what ``AutoVideoProcessor.from_pretrained`` builds from the checkpoint's
``video_preprocessor_config.json`` or the ``video_processor`` entry of its ``processor_config.json``),
so the pixels the LLM sees here are the pixels it sees in transformers, vLLM or lmms-eval. Why no
second path: a plain-torch re-implementation of the same resizing differs from transformers by up to
16/255 on about a fifth of the resized pixels.

The processor is called on already sampled frames (``do_sample_frames=False``: frame sampling is the
video reader's job, ``cacovid_rl.data.video``) with channels-last input stated explicitly, so a clip of
three frames is never mistaken for a channels-first array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoVideoProcessor, LlavaOnevisionVideoProcessor, PretrainedConfig, Qwen2VLVideoProcessor
from transformers.image_utils import ChannelDimension
from transformers.video_processing_utils import BaseVideoProcessor


class FrameError(ValueError):
    """Frames handed to an adapter are not a non-empty ``uint8`` array of shape ``[T, H, W, 3]``."""


class VideoProcessorError(RuntimeError):
    """A checkpoint has no usable video processor, or it does not fit the model's vision tower."""


def check_frames(frames: np.ndarray) -> np.ndarray:
    """Validate decoded frames (``[T, H, W, 3]`` uint8, ``T >= 1``) and return them unchanged."""
    if not isinstance(frames, np.ndarray):
        raise FrameError(f"frames must be a numpy array [T, H, W, 3] of uint8, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise FrameError(f"frames must have dtype uint8 (decoded RGB), got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise FrameError(f"frames must have shape [T, H, W, 3], got {tuple(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise FrameError(f"frames must be non-empty, got shape {tuple(frames.shape)}")
    return frames


def process_video(video_processor: BaseVideoProcessor, frames: np.ndarray) -> dict[str, torch.Tensor]:
    """``video_processor`` applied to one clip of decoded frames: its ``pixel_values_videos`` (and, for
    Qwen, ``video_grid_thw``) exactly as transformers computes them.

    LLaVA-OneVision: ``pixel_values_videos`` ``[1, T, 3, S, S]``. Qwen2-VL / 2.5-VL:
    ``pixel_values_videos`` ``[P, 3 * tp * ps * ps]`` and ``video_grid_thw`` ``[1, 3]``.
    """
    out = video_processor(
        videos=[check_frames(frames)],
        do_sample_frames=False,
        input_data_format=ChannelDimension.LAST,
        return_tensors="pt",
    )
    return dict(out)


def load_video_processor(path: str | Path) -> BaseVideoProcessor:
    """The video processor a local checkpoint ships (``AutoVideoProcessor``, never downloaded)."""
    try:
        return AutoVideoProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise VideoProcessorError(
            f"{path} has no video processor config (video_preprocessor_config.json, or processor_config.json with "
            f"a 'video_processor' entry): save one with the checkpoint's processor, e.g. "
            f"AutoProcessor.from_pretrained(<original checkpoint>).save_pretrained('{path}') ({exc})"
        ) from exc


def default_video_processor(config: PretrainedConfig) -> BaseVideoProcessor:
    """The family's transformers video processor sized for ``config``'s vision tower.

    For models built in memory (tests, the tiny debug models) that have no processor files: the
    published defaults of the class, with the resolution the vision tower needs.
    """
    vision = config.vision_config
    if config.model_type == "llava_onevision":
        return LlavaOnevisionVideoProcessor(size={"height": vision.image_size, "width": vision.image_size})
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        # cap_pixels_per_frame stated, as a saved checkpoint should: unset, transformers warns and means False.
        return Qwen2VLVideoProcessor(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            cap_pixels_per_frame=False,
        )
    raise VideoProcessorError(f"no default video processor for model_type '{config.model_type}'")
