"""Frame sampling (the official read_video_decode: uniform, at most max_fps) and decoding errors."""

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


def official_indices(total_frames: int, fps: float, num_frames: int, decode_fps: float = 1.0) -> list[int]:
    """grpo_video.py read_video_decode's index rule, written out literally."""
    duration = total_frames / fps
    n = min(num_frames, total_frames, int(duration * decode_fps))
    return [round(x) for x in np.linspace(0, total_frames - 1, n)]


def test_sample_indices_match_the_official_rule() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        total = int(rng.integers(1, 2000))
        fps = float(rng.choice([1.0, 7.5, 12.5, 23.976, 25.0, 29.97, 30.0, 60.0]))
        num = int(rng.integers(1, 65))
        max_fps = float(rng.choice([0.5, 1.0, 2.0]))
        expected = official_indices(total, fps, num, max_fps)
        if expected:  # the official asks for 0 frames below 1 / max_fps seconds; we keep one (test above)
            assert sample_frame_indices(total, fps, num, max_fps).tolist() == expected, (total, fps, num, max_fps)
    # exact halves round to even: linspace(0, 5, 5) = 0, 1.25, 2.5, 3.75, 5
    assert sample_frame_indices(6, 1.0, 5).tolist() == [0, 1, 2, 4, 5]
    # int() truncates the per-second cap: 9.99 s at 1 fps is 9 frames, not 10
    assert len(sample_frame_indices(999, 100.0, 32)) == 9


def test_read_frames_follows_the_official_rule_on_a_generated_video(tmp_path: Path) -> None:
    """6 distinct frames at 1 fps, 5 asked: frames 0, 1, 2, 4, 5 (the 2.5 position rounds to even); at 4 fps the
    same 6 frames last 1.5 s, so only one frame is read."""
    rng = np.random.default_rng(1)
    frames = np.repeat(rng.integers(0, 255, (6, 4, 4, 3), dtype=np.uint8), 16, axis=1).repeat(16, axis=2)
    write_mp4(frames, tmp_path / "slow.mp4", fps=1)
    full = read_frames(tmp_path / "slow.mp4", num_frames=6)
    assert len(full) == 6
    np.testing.assert_array_equal(read_frames(tmp_path / "slow.mp4", num_frames=5), full[[0, 1, 2, 4, 5]])
    write_mp4(frames, tmp_path / "fast.mp4", fps=4)
    assert len(read_frames(tmp_path / "fast.mp4", num_frames=5)) == 1


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
