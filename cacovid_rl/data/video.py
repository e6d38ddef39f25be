"""Frame sampling and decoding (decord): the official ``read_video_decode`` (grpo_video.py).

``num_frames`` frames are sampled uniformly over the video, but never more than ``max_fps`` frames per second
of video: ``min(num_frames, total_frames, int(total_frames / avg_fps * max_fps))`` indices
``round(linspace(0, total_frames - 1, n))``, rounded half to even like Python's ``round``. A 5-second clip at
``max_fps=1`` gives 5 frames even when 32 are asked for.

Deliberate deviations, for inputs the official code cannot read at all: a clip shorter than ``1 / max_fps``
seconds gives one frame (the official asks for 0 frames and fails), and an unknown frame rate (some containers
report 0; the official divides by it) is read as one frame per second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class VideoDecodeError(RuntimeError):
    """A video is missing, corrupt or unreadable; the message names the file and what to do."""


def sample_frame_indices(total_frames: int, fps: float, num_frames: int, max_fps: float = 1.0) -> np.ndarray:
    """Indices of the frames to decode: ``linspace`` over the video, at most ``max_fps`` per second.

    ``fps`` is the video's frame rate; a non-positive or unknown rate (some containers report 0)
    is treated as "one frame per second", which makes the cap equal to the frame count.
    Returns a sorted ``int64`` array of at least one and at most ``min(num_frames, total_frames)`` indices.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if max_fps <= 0:
        raise ValueError(f"max_fps must be > 0, got {max_fps}")
    duration = total_frames / fps if fps and fps > 0 else float(total_frames)
    n = max(1, min(num_frames, total_frames, int(duration * max_fps)))
    # ndarray.round is round-half-to-even, the rule of the official per-element Python round().
    return np.linspace(0, total_frames - 1, n).round().astype(np.int64)


def read_frames(path: str | Path, num_frames: int, max_fps: float = 1.0) -> np.ndarray:
    """Decode ``num_frames`` uniformly sampled frames (at most ``max_fps`` per second) as ``[T, H, W, 3]`` uint8 RGB.

    Raises ``VideoDecodeError`` naming the file when it is missing, empty, corrupt or undecodable.
    """
    import decord  # imported lazily: decord starts native threads that tests without video do not need

    p = Path(path)
    if not p.is_file():
        raise VideoDecodeError(
            f"video file '{p}' does not exist: check data.video_root and the record's video/path field"
        )
    if p.stat().st_size == 0:
        raise VideoDecodeError(f"video file '{p}' is empty (0 bytes): re-download or regenerate it")
    try:
        reader = decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        if total < 1:
            raise VideoDecodeError(f"video file '{p}' has no decodable frames: re-encode or drop the record")
        idx = sample_frame_indices(total, float(reader.get_avg_fps()), num_frames, max_fps)
        frames = reader.get_batch(idx.tolist()).asnumpy()
    except VideoDecodeError:
        raise
    except Exception as exc:  # decord raises its own DECORDError and plain RuntimeErrors
        raise VideoDecodeError(
            f"cannot decode video file '{p}' ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "the file is corrupt or in an unsupported format: re-encode it (H.264 mp4) or drop the record"
        ) from exc
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoDecodeError(f"video file '{p}' decoded to unexpected shape {frames.shape}; expected [T, H, W, 3]")
    return np.ascontiguousarray(frames, dtype=np.uint8)
