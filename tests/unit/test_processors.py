"""The adapters' encoding against transformers' real processors, on frames that must be resized.

The adapters preprocess with the checkpoint's own transformers video processor (``preprocessing.py``),
so these tests pin that the adapter's path IS the processor's output: the user-facing processor
(``AutoProcessor`` / ``LlavaOnevisionVideoProcessor`` / ``Qwen2_5_VLProcessor``), built independently
from the same files or settings, gives bit-identical ``input_ids``, ``pixel_values_videos`` (and
``video_grid_thw``, ``mm_token_type_ids``, ``second_per_grid_ts``) and the vision tower fed with the
processor's pixels gives bit-identical video features. No test here skips: torchvision is a dependency.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.video_utils import VideoMetadata

from cacovid_rl.config import ModelConfig
from cacovid_rl.models.loading import TINY_ASSET, load_adapter
from cacovid_rl.models.preprocessing import FrameError, process_video
from cacovid_rl.models.tiny import save_adapter, tiny_llava_onevision, tiny_qwen2_5_vl

PROMPT = "what colour is the object ?"


def rand_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def video_block(enc) -> torch.Tensor:
    return enc.inputs_embeds[enc.video_start : enc.video_start + enc.num_video_tokens]


def test_shipped_llava_matches_its_auto_processor_on_resized_frames():
    """The shipped tiny model (64 px) on 90 x 70 frames: its ``AutoProcessor`` and the adapter agree exactly."""
    adapter = load_adapter(ModelConfig(path="tiny"))
    processor = AutoProcessor.from_pretrained(TINY_ASSET)
    assert type(processor.video_processor) is LlavaOnevisionVideoProcessor
    frames = rand_frames(3, 70, 90)
    text = adapter.render_prompt(PROMPT, with_video=True)
    ref = processor(text=[text], videos=[frames], return_tensors="pt")
    ours = adapter.native_inputs(frames, PROMPT)
    assert ref["pixel_values_videos"].shape == (1, 3, 3, 64, 64)  # resized, not cropped or padded
    assert_identical(ours["pixel_values_videos"], ref["pixel_values_videos"])
    assert_identical(ours["input_ids"], ref["input_ids"])  # same T*N + 1 placeholder expansion
    enc = adapter.encode(frames, PROMPT)
    with torch.no_grad():
        features = adapter.model.model.get_video_features(ref["pixel_values_videos"]).pooler_output[0]
    assert_identical(video_block(enc), features[:-1])  # the trailing image_newline is never scored
    assert_identical(enc.inputs_embeds[enc.video_start + enc.num_video_tokens], features[-1])


def test_llava_at_7b_resolution_matches_the_video_processor():
    """A 7B-like LLaVA-OneVision video processor (SigLIP 384 px, bicubic, mean/std 0.5) on 480 x 640 frames."""
    seven_b = {
        "size": {"height": 384, "width": 384},
        "resample": 3,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }
    base = tiny_llava_onevision(seed=0, image_size=384, patch_size=14)
    adapter = type(base)(base.model, base.tokenizer, LlavaOnevisionVideoProcessor(**seven_b))
    frames = rand_frames(2, 480, 640, seed=1)
    ref = LlavaOnevisionVideoProcessor(**seven_b)(videos=[frames], return_tensors="pt")["pixel_values_videos"]
    assert ref.shape == (1, 2, 3, 384, 384)
    assert_identical(adapter.pixel_values(frames), ref)
    enc = adapter.encode(frames, PROMPT)
    assert enc.tokens_per_frame == 14 * 14  # 27 x 27 patches pooled to ceil(27 / 2) ** 2
    with torch.no_grad():
        features = adapter.model.model.get_video_features(ref).pooler_output[0]
    assert_identical(video_block(enc), features[:-1])


def qwen_processor(adapter) -> Qwen2_5_VLProcessor:
    """The processor a Qwen2.5-VL checkpoint ships, assembled from the adapter's parts (the tiny model has none)."""
    vp = adapter.video_processor
    image_processor = Qwen2VLImageProcessor(
        patch_size=vp.patch_size, merge_size=vp.merge_size, temporal_patch_size=vp.temporal_patch_size
    )
    video_processor = Qwen2VLVideoProcessor(**vp.to_dict())  # an independent copy of the same settings
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=adapter.tokenizer,
        video_processor=video_processor,
        chat_template=adapter.tokenizer.chat_template,
    )


@pytest.mark.parametrize(
    ("frame_size", "shape"),
    [(48, (5, 70, 90)), (64, (4, 30, 100))],  # odd frame count: the processor repeats the last frame
)
def test_qwen_matches_qwen2_5_vl_processor_on_resized_frames(frame_size, shape):
    adapter = tiny_qwen2_5_vl(seed=0, frame_size=frame_size)
    processor = qwen_processor(adapter)
    frames = rand_frames(*shape, seed=2)
    text = adapter.render_prompt(PROMPT, with_video=True)
    # frames sampled at 2 fps: the processor reads the rate from the clip's metadata
    meta = VideoMetadata(total_num_frames=shape[0], fps=2.0)
    ref = processor(text=[text], videos=[frames], video_metadata=[meta], return_tensors="pt", do_sample_frames=False)
    ours = adapter.native_inputs(frames, PROMPT, fps=2.0)
    t, h, w = ref["video_grid_thw"][0].tolist()
    assert (h * 8, w * 8) != shape[1:] and t == (shape[0] + 1) // 2  # resized, padded to whole temporal groups
    for key in ("input_ids", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert_identical(ours[key], ref[key].to(ours[key].dtype))
    enc = adapter.encode(frames, PROMPT, fps=2.0)
    with torch.no_grad():
        feats = adapter.model.model.get_video_features(ref["pixel_values_videos"], ref["video_grid_thw"])
        positions, _ = adapter.model.model.get_rope_index(
            ref["input_ids"],
            mm_token_type_ids=ref["mm_token_type_ids"],
            video_grid_thw=ref["video_grid_thw"],
            second_per_grid_ts=ref["second_per_grid_ts"],
        )
    assert_identical(video_block(enc), feats.pooler_output[0])
    assert_identical(enc.position_ids, positions[:, 0])


def test_qwen_at_7b_settings_matches_the_video_processor():
    """Qwen2.5-VL-7B's video processor (patch 14, merge 2, its pixel budget) on 480 x 640 frames."""
    base = tiny_qwen2_5_vl(seed=0, patch_size=14)
    settings = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "cap_pixels_per_frame": False}
    adapter = type(base)(base.model, base.tokenizer, Qwen2VLVideoProcessor(**settings))
    frames = rand_frames(2, 480, 640, seed=3)
    ref = Qwen2VLVideoProcessor(**settings)(videos=[frames], return_tensors="pt")
    pixels, grid = adapter.pixel_values(frames)
    assert grid.tolist() == ref["video_grid_thw"].tolist() == [[1, 34, 46]]  # 476 x 644: multiples of 28
    assert_identical(pixels, ref["pixel_values_videos"])


def test_saved_checkpoint_reloads_the_same_video_processor(tmp_path):
    for adapter in (tiny_llava_onevision(seed=0), tiny_qwen2_5_vl(seed=0)):
        path = save_adapter(adapter, tmp_path / adapter.family)
        assert (path / "video_preprocessor_config.json").is_file()
        loaded = load_adapter(ModelConfig(path=str(path)))
        assert type(loaded.video_processor) is type(adapter.video_processor)
        assert loaded.video_processor.to_dict() == adapter.video_processor.to_dict()


def test_processor_that_does_not_fit_the_tower_is_refused():
    base = tiny_llava_onevision(seed=0)  # a 48 px tower
    with pytest.raises(ValueError, match="vision tower expects 48x48"):
        type(base)(base.model, base.tokenizer, LlavaOnevisionVideoProcessor(size={"height": 64, "width": 64}))
    qwen = tiny_qwen2_5_vl(seed=0)  # patch 8
    with pytest.raises(ValueError, match="do not match the vision config"):
        type(qwen)(qwen.model, qwen.tokenizer, Qwen2VLVideoProcessor(patch_size=14))


def test_frames_are_validated_before_the_processor():
    vp = LlavaOnevisionVideoProcessor(size={"height": 48, "width": 48})
    with pytest.raises(FrameError, match="uint8"):
        process_video(vp, rand_frames(2, 48, 48).astype(np.float32))
    with pytest.raises(FrameError, match=r"\[T, H, W, 3\]"):
        process_video(vp, rand_frames(2, 48, 48)[..., :2])
    # three frames of height 3: channels-last is stated, never guessed
    out = process_video(vp, rand_frames(3, 3, 40))
    assert out["pixel_values_videos"].shape == (1, 3, 3, 48, 48)
