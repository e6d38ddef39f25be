"""``CacovidLmms`` in-process: lmms-eval finds it by name, it answers as ``CacovidPruner`` does, and it
returns lmms-eval ``GenerationResult`` objects carrying the kept and total video tokens.

Needs lmms-eval (the ``lmms`` extra): without it these tests fail (never skip) with the wrapper's install
command; the import happens in a fixture so that the rest of the suite still runs.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from cacovid_rl.models.tiny import save_adapter, tiny_llava_onevision
from cacovid_rl.policy.network import CacovidPolicy

QUESTION = "what colour is the striped object ?"


@pytest.fixture(scope="module")
def wrapper() -> ModuleType:
    try:
        return importlib.import_module("cacovid_rl.lmms_eval_wrapper")
    except ImportError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return save_adapter(tiny_llava_onevision(seed=0, init_std=0.2), tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def policy_dir(llm_dir, tmp_path_factory):
    from cacovid_rl.config import ModelConfig
    from cacovid_rl.models.loading import load_adapter

    torch.manual_seed(0)
    adapter = load_adapter(ModelConfig(path=str(llm_dir)))
    return CacovidPolicy.from_adapter(adapter).save_pretrained(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)


def request(gen_kwargs, doc_id, to_visual) -> Any:
    """An lmms-eval request as its evaluator builds one for a simple model."""
    from lmms_eval.api.instance import Instance

    args = (QUESTION, gen_kwargs, to_visual, doc_id, "toy", "test")
    return Instance("generate_until", args, idx=0, metadata={"task": "toy", "doc_id": doc_id, "repeats": 1})


def to_visual(doc):
    return [doc["video"]]


def test_lmms_eval_resolves_cacovid_through_the_entry_point(wrapper):
    from lmms_eval.models import get_model, get_model_manifest

    assert get_model("cacovid") is wrapper.CacovidLmms
    assert get_model_manifest("cacovid").simple_class_path == "cacovid_rl.lmms_eval_wrapper.CacovidLmms"


def test_answers_are_the_pruners_with_video_token_counts(wrapper, llm_dir, policy_dir, frames):
    model = wrapper.CacovidLmms.create_from_arg_string(
        f"pretrained={llm_dir},policy={policy_dir},retention=0.25,max_new_tokens=6",
        {"batch_size": 1, "max_batch_size": None, "device": "cpu"},
    )
    model.task_dict = {"toy": {"test": {"d0": {"video": frames}, "d1": {"video": frames[:4]}, "bad": {"video": None}}}}
    first = request({"until": ["\n"], "max_new_tokens": 6}, "d0", to_visual)
    answers = model.generate_until([first, request({"max_new_tokens": 3}, "d1", to_visual)])
    assert all(isinstance(a, wrapper.GenerationResult) for a in answers) and len(answers) == 2
    pruner = model.pruner
    direct = pruner.answer(pruner.adapter(str(llm_dir)), frames, QUESTION, 0.25, max_new_tokens=6)
    assert answers[0].text == direct.text.split("\n", 1)[0]
    counts = answers[0].token_counts
    assert isinstance(counts, wrapper.VideoTokenCounts)
    assert counts.to_dict() == {"video_tokens_kept": math.floor(0.25 * 6 * 9), "video_tokens_total": 6 * 9}
    assert answers[1].token_counts.video_tokens_total == 4 * 9
    assert len(answers[1].text.split()) <= 3
    assert len(model.last_timings) == 2

    words = direct.text.split()
    if len(words) > 1:  # "until" cuts the answer at the first stop string
        (cut,) = model.generate_until([request({"until": f" {words[1]}", "max_new_tokens": 6}, "d0", to_visual)])
        assert cut.text == direct.text.split(f" {words[1]}", 1)[0] and cut.text.startswith(words[0])

    with pytest.raises(ValueError, match="exactly one video"):
        model.generate_until([request({}, "bad", to_visual)])
    with pytest.raises(NotImplementedError, match="generate_until only"):
        model.loglikelihood([request(" A", "d0", to_visual)])


def test_bad_model_args(wrapper, llm_dir, policy_dir):
    with pytest.raises(TypeError, match="unknown model_args"):
        wrapper.CacovidLmms(pretrained=str(llm_dir), policy=str(policy_dir), temperature=0.5)
    with pytest.raises(ValueError, match="one question at a time"):
        wrapper.CacovidLmms(pretrained=str(llm_dir), policy=str(policy_dir), batch_size=4)


def test_method_answers_with_a_training_free_baseline(wrapper, llm_dir, frames):
    """``method=flashvid``: no policy needed; the answer is the compressed block's, at the same budget."""
    from cacovid_rl.baselines import SelectionContext, compress, get_method

    model = wrapper.CacovidLmms.create_from_arg_string(
        f"pretrained={llm_dir},method=flashvid,retention=0.25,max_new_tokens=6",
        {"batch_size": 1, "max_batch_size": None, "device": "cpu"},
    )
    assert model.pruner is None and model.method == "flashvid"
    model.task_dict = {"toy": {"test": {"d0": {"video": frames}}}}
    (answer,) = model.generate_until([request({"max_new_tokens": 6}, "d0", to_visual)])
    adapter = model.adapter()
    enc = adapter.encode(frames, QUESTION)
    block = compress(get_method("flashvid"), SelectionContext(enc=enc, adapter=adapter), 0.25)
    assert answer.text == adapter.generate_compressed(enc, [block], 6)[0]
    assert answer.token_counts.to_dict() == {"video_tokens_kept": math.floor(0.25 * 6 * 9), "video_tokens_total": 54}
    assert set(model.last_timings[0]) >= {"encode", "select", "generate", "total"}


def test_method_model_args_are_checked(wrapper, llm_dir):
    with pytest.raises(ValueError, match="unknown method 'tome'"):
        wrapper.CacovidLmms(pretrained=str(llm_dir), method="tome")
    with pytest.raises(ValueError, match="needs policy"):
        wrapper.CacovidLmms(pretrained=str(llm_dir))
