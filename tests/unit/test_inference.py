"""CacovidPruner (one-call pruned answers) on tiny models (the lmms-eval wrapper: tests/lmms_eval)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cacovid_rl.inference import CacovidPruner, PrunedAnswer, subsample_frames
from cacovid_rl.models.tiny import save_adapter, tiny_llava_onevision, tiny_qwen2_5_vl
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.types import PolicyScores

QUESTION = "what colour is the striped object ?"


@pytest.fixture(scope="module")
def adapter():
    return tiny_llava_onevision(seed=0, init_std=0.2)


@pytest.fixture(scope="module")
def policy_dir(adapter, tmp_path_factory):
    torch.manual_seed(0)
    return CacovidPolicy.from_adapter(adapter).save_pretrained(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def pruner(policy_dir):
    return CacovidPruner.from_pretrained(policy_dir, device="cpu")


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)


def test_answer_prunes_with_the_policy_and_selection(pruner, adapter, frames):
    out = pruner.answer(adapter, frames, QUESTION, retention=0.25, max_new_tokens=6)
    assert isinstance(out, PrunedAnswer)
    assert out.num_video_tokens == 6 * 9
    assert len(out.kept_indices) == math.floor(0.25 * 54) and out.kept_ratio == pytest.approx(13 / 54)
    assert np.all(np.diff(out.kept_indices) > 0) and out.kept_indices.dtype == np.int64
    assert set(out.timings) == {"decode", "encode", "score", "select", "generate", "total"}
    assert all(v >= 0 for v in out.timings.values())
    enc = adapter.encode(frames, QUESTION)
    assert out.text == adapter.generate(enc, torch.from_numpy(out.kept_indices)[None], 6)[0]


@pytest.mark.parametrize("case_id", ["eval_002", "eval_008"])
def test_answer_keeps_what_the_official_selection_keeps(pruner, monkeypatch, case_id):
    """Fed the official code's policy scores (golden data), ``answer`` keeps the official code's tokens: checked
    against the official output, not against ``select_tokens``, so a selection bug cannot hide behind itself."""
    from tests.golden_io import blob, load_golden

    case = next(c for c in load_golden("eval_selection")["cases"] if c["id"] == case_id)
    assert (case["T"], case["N"], case["imp_ratio"]) == (4, 16, pruner.imp_ratio)
    scores = PolicyScores(torch.from_numpy(blob(case["token_scores"])), torch.from_numpy(blob(case["frame_scores"])))
    monkeypatch.setattr(pruner.policy, "score", lambda enc: scores)
    # 64 px frames: 8 x 8 patches pooled to the golden case's 4 x 4 tokens a frame; 4 frames.
    llm = tiny_llava_onevision(seed=0, image_size=64)
    frames = np.random.default_rng(2).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    out = pruner.answer(llm, frames, QUESTION, case["retention"], num_frames=4, max_new_tokens=1)
    assert out.num_video_tokens == 4 * 16
    assert out.kept_indices.tolist() == case["official_kept"]


def test_full_retention_equals_the_unpruned_answer(pruner, adapter, frames):
    out = pruner.answer(adapter, frames, QUESTION, retention=1.0, max_new_tokens=6)
    enc = adapter.encode(frames, QUESTION)
    assert len(out.kept_indices) == out.num_video_tokens
    assert out.text == adapter.generate(enc, None, 6)[0]


def test_answer_from_model_and_video_paths(pruner, adapter, frames, tmp_path):
    from cacovid_rl.data.synthetic import write_mp4

    save_adapter(adapter, tmp_path / "llm")
    # 12 frames of 64 x 64 at 4 fps: a 3-second clip (decord mis-strides some widths such as 48).
    clip = np.random.default_rng(1).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    write_mp4(clip, tmp_path / "clip.mp4", fps=4)
    out = pruner.answer(
        str(tmp_path / "llm"), str(tmp_path / "clip.mp4"), QUESTION, 0.5, num_frames=4, max_new_tokens=4
    )
    assert out.num_video_tokens == 3 * 9  # at most 1 frame per second of video: 3 frames
    assert str(tmp_path / "llm") in pruner._adapters  # loaded once, then cached
    again = pruner.answer(
        str(tmp_path / "llm"), str(tmp_path / "clip.mp4"), QUESTION, 0.5, num_frames=4, max_new_tokens=4
    )
    assert again.text == out.text


def test_frames_are_subsampled_uniformly(pruner, adapter, frames):
    assert subsample_frames(frames, 3).shape[0] == 3
    assert np.array_equal(subsample_frames(frames, 3)[[0, -1]], frames[[0, -1]])
    out = pruner.answer(adapter, frames, QUESTION, 0.5, num_frames=2, max_new_tokens=2)
    assert out.num_video_tokens == 2 * 9


def test_bad_inputs(pruner, adapter, frames):
    with pytest.raises(ValueError, match="retention"):
        pruner.answer(adapter, frames, QUESTION, retention=0.0)
    with pytest.raises(ValueError, match="retention"):
        pruner.answer(adapter, frames, QUESTION, retention=1.5)
    with pytest.raises(TypeError, match="file path or"):
        pruner.answer(adapter, frames.tolist(), QUESTION, retention=0.5)
    with pytest.raises(ValueError, match="uint8"):
        pruner.answer(adapter, frames.astype(np.float32), QUESTION, retention=0.5)
    with pytest.raises(ValueError, match="hidden size"):
        pruner.answer(tiny_qwen2_5_vl(seed=0, hidden_size=32), frames, QUESTION, retention=0.5)
    with pytest.raises(FileNotFoundError, match="no saved policy"):
        CacovidPruner.from_pretrained("/nonexistent/policy")


def test_options_and_problem_type_build_the_training_prompt(pruner, adapter, frames):
    """``options`` + the implied ``multiple choice`` give the prompt ``build_prompt`` makes of a training record."""
    from cacovid_rl.data.prompts import build_prompt

    out = pruner.answer(adapter, frames, QUESTION, 0.5, max_new_tokens=3, options=["red", "green"], keep_frames=True)
    assert out.prompt == build_prompt(f"{QUESTION}\nOptions:\nA. red\nB. green", "multiple choice")
    assert len(out.kept_indices) == 27  # floor(0.5 x 6 frames x 9 tokens)
    assert out.token_scores.shape == (6, 9) and out.frame_scores.shape == (6,) and out.frames is frames
    plain = pruner.answer(adapter, frames, QUESTION, 0.5, max_new_tokens=3)
    assert plain.prompt == QUESTION and plain.frames is None  # no type, no options: the question as written
    with pytest.raises(ValueError, match="multiple choice"):
        pruner.answer(adapter, frames, QUESTION, 0.5, options=["red"], problem_type="numerical")
