"""Frame preprocessing for the video LLMs, in plain torch.

transformers 5 video processors (``LlavaOnevisionVideoProcessor``, ``Qwen2VLVideoProcessor``) require
torchvision, which this project does not depend on. These classes reproduce their arithmetic (resize
with antialiased bicubic interpolation on the uint8 frames, round and clamp, then fused rescale +
normalise, then Qwen's patchify) from the same configuration keys as the checkpoint's
``video_preprocessor_config.json``, so a real checkpoint and a tiny test model are preprocessed by the
same code. When torchvision is installed, ``from_processor`` still reads the values from the real
processor so the two cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

VIDEO_PREPROCESSOR_FILE = "video_preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"


class FrameError(ValueError):
    """Frames handed to an adapter are not a non-empty ``uint8`` array of shape ``[T, H, W, 3]``."""


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


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of ``[T, 3, H, W]`` uint8 frames, rounded back to the uint8 grid.

    Matches torchvision's tensor resize for uint8 inputs (float interpolation, round, clamp).
    """
    x = frames.float()
    if (x.shape[-2], x.shape[-1]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    return x


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(check_frames(frames))).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class _Normalize:
    image_mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = tuple(OPENAI_CLIP_STD)
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale then normalise ``[T, 3, H, W]`` float frames (channels on dim 1)."""
        if self.do_rescale:
            x = x * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.image_std, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    def save(self, directory: str | Path) -> None:
        """Write the ``video_preprocessor_config.json`` that ``load`` (and transformers) read."""
        Path(directory, VIDEO_PREPROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _common(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("image_mean", "image_std"):
        if cfg.get(key) is not None:
            value = cfg[key]
            out[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
    for key in ("rescale_factor",):
        if cfg.get(key) is not None:
            out[key] = float(cfg[key])
    for key in ("do_rescale", "do_normalize"):
        if cfg.get(key) is not None:
            out[key] = bool(cfg[key])
    return out


@dataclass(frozen=True)
class LlavaVideoPreprocessing(_Normalize):
    """LLaVA-OneVision: every frame resized to ``height x width`` (384 x 384 for the 7B), then normalised."""

    height: int = 384
    width: int = 384
    video_processor_type: str = field(default="LlavaOnevisionVideoProcessor", repr=False)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> LlavaVideoPreprocessing:
        size = cfg.get("size") or {}
        kwargs = _common(cfg)
        if "height" in size and "width" in size:
            kwargs.update(height=int(size["height"]), width=int(size["width"]))
        elif "shortest_edge" in size:
            kwargs.update(height=int(size["shortest_edge"]), width=int(size["shortest_edge"]))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["size"] = {"height": d.pop("height"), "width": d.pop("width")}
        d["do_resize"] = True
        d["resample"] = 3  # bicubic
        return d

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """``[T, H, W, 3]`` uint8 -> ``pixel_values_videos`` ``[1, T, 3, height, width]`` float32."""
        x = _resize(_to_tensor(frames), self.height, self.width)
        return self.normalize(x).unsqueeze(0).contiguous()


@dataclass(frozen=True)
class QwenVideoPreprocessing(_Normalize):
    """Qwen2.5-VL: resize to multiples of ``patch_size * merge_size`` within a pixel budget, then patchify.

    Frames are grouped ``temporal_patch_size`` at a time (the last frame is repeated to fill the last group).
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    video_processor_type: str = field(default="Qwen2VLVideoProcessor", repr=False)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> QwenVideoPreprocessing:
        kwargs = _common(cfg)
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if cfg.get(key) is not None:
                kwargs[key] = int(cfg[key])
        size = cfg.get("size") or {}
        if size.get("shortest_edge") is not None:
            kwargs["min_pixels"] = int(size["shortest_edge"])
        if size.get("longest_edge") is not None:
            kwargs["max_pixels"] = int(size["longest_edge"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["size"] = {"shortest_edge": d.pop("min_pixels"), "longest_edge": d.pop("max_pixels")}
        d["do_resize"] = True
        d["resample"] = 3
        return d

    def __call__(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, H, W, 3]`` uint8 -> (``pixel_values_videos`` ``[P, 3*tp*ps*ps]``, ``video_grid_thw`` ``[1, 3]``)."""
        x = _to_tensor(frames)
        factor = self.patch_size * self.merge_size
        height, width = smart_resize(
            int(x.shape[-2]), int(x.shape[-1]), factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        x = self.normalize(_resize(x, height, width))
        tp, ps, ms = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -x.shape[0] % tp:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
        t, c = x.shape[0] // tp, x.shape[1]
        gh, gw = height // ps, width // ps
        # Same layout as Qwen2VLVideoProcessor.patchify: (t, h-blocks, w-blocks, mh, mw) x (c, tp, ps, ps).
        patches = x.reshape(t, tp, c, gh // ms, ms, ps, gw // ms, ms, ps)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * gh * gw, c * tp * ps * ps)
        return patches.contiguous(), torch.tensor([[t, gh, gw]], dtype=torch.long)


def load_video_preprocessing(directory: str | Path, family: str) -> LlavaVideoPreprocessing | QwenVideoPreprocessing:
    """Read a checkpoint's video preprocessing settings.

    Looked up in the layouts transformers 5 writes: ``video_preprocessor_config.json`` (a saved video
    processor), the ``video_processor`` entry of ``processor_config.json`` (a saved processor), then
    ``preprocessor_config.json`` (older checkpoints). Without any, the family's published defaults.
    """
    cls = LlavaVideoPreprocessing if family == "llava_onevision" else QwenVideoPreprocessing
    d = Path(directory)
    if (d / VIDEO_PREPROCESSOR_FILE).is_file():
        return cls.from_dict(json.loads((d / VIDEO_PREPROCESSOR_FILE).read_text()))
    if (d / PROCESSOR_FILE).is_file():
        nested = json.loads((d / PROCESSOR_FILE).read_text()).get("video_processor")
        if isinstance(nested, dict):
            return cls.from_dict(nested)
    if (d / "preprocessor_config.json").is_file():
        return cls.from_dict(json.loads((d / "preprocessor_config.json").read_text()))
    return cls()


def from_video_processor(video_processor: Any, family: str) -> LlavaVideoPreprocessing | QwenVideoPreprocessing:
    """Build the torch preprocessing from a real transformers video processor (when torchvision is installed)."""
    cls = LlavaVideoPreprocessing if family == "llava_onevision" else QwenVideoPreprocessing
    return cls.from_dict(video_processor.to_dict())
