"""CacovidPruner (one-call pruned answers) and the lmms-eval model wrapper, on tiny models."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from cacovid_rl.inference import CacovidPruner, PrunedAnswer, subsample_frames
from cacovid_rl.lmms_eval_wrapper import CacovidLmms
from cacovid_rl.models.tiny import save_adapter, tiny_llava_onevision, tiny_qwen2_5_vl
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.policy.selection import select_tokens

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
    keep = select_tokens(pruner.policy.score(enc), 0.25)
    assert np.array_equal(keep.numpy(), out.kept_indices)
    assert out.text == adapter.generate(enc, keep[None], 6)[0]


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


@dataclass
class FakeInstance:
    """The part of lmms-eval's ``Instance`` a simple model reads: ``args``."""

    args: tuple[Any, ...]


def test_lmms_eval_wrapper(policy_dir, adapter, frames, tmp_path):
    save_adapter(adapter, tmp_path / "llm")
    model = CacovidLmms(pretrained=str(tmp_path / "llm"), policy=str(policy_dir), retention=0.25, max_new_tokens=6)
    docs = {"d0": {"video": frames}, "d1": {"video": frames[:4]}, "bad": {"video": None}}
    model.task_dict = {"toy": {"test": docs}}

    def to_visual(doc):
        return [doc["video"]]

    requests = [
        FakeInstance((QUESTION, {"until": ["\n"], "max_new_tokens": 6}, to_visual, "d0", "toy", "test")),
        FakeInstance((QUESTION, {"max_new_tokens": 3}, to_visual, "d1", "toy", "test")),
    ]
    answers = model.generate_until(requests)
    pruner = model.pruner
    direct = pruner.answer(pruner.adapter(str(tmp_path / "llm")), frames, QUESTION, 0.25, max_new_tokens=6)
    assert answers[0] == direct.text and len(answers) == 2
    assert len(answers[1].split()) <= 3
    assert len(model.last_timings) == 2

    first_word = direct.text.split()[0] if direct.text.split() else ""
    if len(direct.text.split()) > 1:  # "until" cuts the answer at the first stop string
        cut = model.generate_until(
            [
                FakeInstance(
                    (
                        QUESTION,
                        {"until": f" {direct.text.split()[1]}", "max_new_tokens": 6},
                        to_visual,
                        "d0",
                        "toy",
                        "test",
                    )
                )
            ]
        )
        assert cut == [direct.text.split(f" {direct.text.split()[1]}", 1)[0]] and cut[0].startswith(first_word)

    with pytest.raises(ValueError, match="exactly one video"):
        model.generate_until([FakeInstance((QUESTION, {}, to_visual, "bad", "toy", "test"))])
    with pytest.raises(NotImplementedError, match="generate_until only"):
        model.loglikelihood([FakeInstance((QUESTION, " A", to_visual, "d0", "toy", "test"))])
    with pytest.raises(TypeError, match="unknown model_args"):
        CacovidLmms(pretrained=str(tmp_path / "llm"), policy=str(policy_dir), temperature=0.5)
