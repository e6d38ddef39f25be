"""Frame sampling (uniform, at most max_fps) and decoding errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cacovid_rl.data.synthetic import write_mp4
from cacovid_rl.data.video import VideoDecodeError, read_frames, sample_frame_indices


def test_sample_indices_uniform_and_capped_by_fps() -> None:
    np.testing.assert_array_equal(sample_frame_indices(8, 1.0, 8), np.arange(8))
    np.testing.assert_array_equal(sample_frame_indices(100, 1.0, 5), [0, 25, 50, 74, 99])
    # 10 s at 30 fps: 32 asked, at most 1 per second -> 10 frames spread over the whole video
    idx = sample_frame_indices(300, 30.0, 32)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 299 and np.all(np.diff(idx) > 0)
    assert len(sample_frame_indices(300, 30.0, 32, max_fps=2.0)) == 20
    # a clip shorter than a second still gives one frame
    np.testing.assert_array_equal(sample_frame_indices(10, 30.0, 8), [0])
    assert len(sample_frame_indices(5, 0.0, 8)) == 5  # unknown fps: one frame per second assumed
    with pytest.raises(ValueError):
        sample_frame_indices(0, 1.0, 8)


def test_read_frames_decodes_written_video(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (6, 4, 4, 3), dtype=np.uint8), 16, axis=1).repeat(16, axis=2)
    write_mp4(frames, tmp_path / "v.mp4")
    out = read_frames(tmp_path / "v.mp4", num_frames=6)
    assert out.shape == (6, 64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - frames).mean() < 6  # near-lossless H.264
    sub = read_frames(tmp_path / "v.mp4", num_frames=3)
    np.testing.assert_array_equal(sub, out[[0, 2, 5]])  # linspace(0, 5, 3) rounds to 0, 2, 5


def test_read_frames_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match=r"missing\.mp4.*does not exist"):
        read_frames(tmp_path / "missing.mp4", 8)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoDecodeError, match=r"empty\.mp4.*empty"):
        read_frames(tmp_path / "empty.mp4", 8)
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoDecodeError, match=r"junk\.mp4.*corrupt"):
        read_frames(tmp_path / "junk.mp4", 8)
