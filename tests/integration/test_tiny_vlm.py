"""The shipped tiny video LLM (``model.path: tiny``): loads offline, answers from the right tokens, and stops.

Everything here goes through the library (``load_adapter``, the baselines, the blind test), as the RL loop does.
The recipe that trains the model, and its determinism test, live in ``research/tiny_vlm`` (docs/TINY_VLM.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cacovid_rl.baselines import SelectionContext, get_method
from cacovid_rl.config import ModelConfig
from cacovid_rl.data import synthetic as S
from cacovid_rl.data.blind_test import run_blind_test
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import load_records
from cacovid_rl.data.video import read_frames
from cacovid_rl.models.llava_onevision import LlavaOnevisionAdapter
from cacovid_rl.models.loading import TINY_ASSET, load_adapter
from cacovid_rl.types import EncodedQuestion

ASSET = TINY_ASSET
BUDGET = 12  # 10% of the 128 video tokens


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh synthetic dataset under a seed the shipped model was never trained on."""
    out = tmp_path_factory.mktemp("unseen")
    S.make_synthetic(out, n=240, seed=2024, fractions=(0.0, 0.0, 1.0))
    return out


@pytest.fixture(scope="module")
def adapter() -> LlavaOnevisionAdapter:
    return load_adapter(ModelConfig(path="tiny"))


@pytest.fixture(scope="module")
def questions(adapter: LlavaOnevisionAdapter, unseen: Path) -> list[tuple[EncodedQuestion, S.Scene, list[int]]]:
    """Each test question encoded once, with its scene and oracle tokens (from the record's ``meta``)."""
    raw = json.loads((unseen / "test.json").read_text())
    out = []
    for rec, r in zip(load_records(unseen / "test.json").records, raw, strict=True):
        enc = adapter.encode(read_frames(rec.video, S.NUM_FRAMES), build_prompt(rec.problem, rec.problem_type))
        out.append((enc, S.scene_from_record(r), r["meta"]["oracle_tokens"]))
    return out


def box_padded(scene: S.Scene, oracle: list[int], generator: torch.Generator) -> torch.Tensor:
    """What a question-aware policy keeps: the asked box, padded with other boxes' tokens (random order)."""
    others = sorted({i for o in scene.objects for i in o.token_indices()} - set(oracle))
    padding = torch.tensor(others)[torch.randperm(len(others), generator=generator)]
    return torch.cat([torch.tensor(oracle[:BUDGET]), padding])[:BUDGET].sort().values


def accuracy(adapter: LlavaOnevisionAdapter, questions: list, keeps: list[torch.Tensor | None]) -> dict[str, float]:
    """First-token accuracy (every answer is one word) overall and on the two kinds of questions whose answer is
    only in the video: the named box's dot colour and its dot count (the white-box prior excluded)."""
    correct = []
    for (enc, scene, _), keep in zip(questions, keeps, strict=True):
        (text,) = adapter.generate(enc, None if keep is None else keep[None], max_new_tokens=1)
        correct.append(text.strip() == scene.answer)
    c = torch.tensor(correct)
    kind = np.array([("prior" if s.prior else s.problem_type) for _, s, _ in questions])
    return {
        "accuracy": float(c.float().mean()),
        "colour": float(c[torch.from_numpy(kind == "multiple choice")].float().mean()),
        "dots": float(c[torch.from_numpy(kind == "numerical")].float().mean()),
    }


def test_shipped_layout_is_standard_and_small() -> None:
    names = {p.name for p in ASSET.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"chat_template.jinja", "processor_config.json", "training_report.json"} <= names
    assert sum(p.stat().st_size for p in ASSET.iterdir()) < 10 * 2**20
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["model_type"] == "llava_onevision"
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "full"
    assert cfg["vision_config"]["num_hidden_layers"] == 1
    proc = json.loads((ASSET / "processor_config.json").read_text())
    assert proc["processor_class"] == "LlavaOnevisionProcessor"
    assert proc["video_processor"]["size"] == {"height": S.FRAME_SIZE, "width": S.FRAME_SIZE}


def test_accuracy_needs_the_right_tokens(adapter: LlavaOnevisionAdapter, questions: list) -> None:
    def select(name: str) -> list[torch.Tensor]:
        method, gen = get_method(name), torch.Generator().manual_seed(1)
        return [method.select(SelectionContext(e, generator=gen, oracle_tokens=o), 0.1) for e, _, o in questions]

    full = accuracy(adapter, questions, [None] * len(questions))
    rand = accuracy(adapter, questions, select("random"))
    oracle = accuracy(adapter, questions, select("oracle"))
    gen = torch.Generator().manual_seed(1)
    boxes = accuracy(adapter, questions, [box_padded(s, o, gen) for _, s, o in questions])
    chance = 0.25  # four options, four counts
    assert full["accuracy"] >= 0.9 > chance + 0.6, full
    assert rand["accuracy"] <= full["accuracy"] - 0.4, (full, rand)
    # The asked box + padding answers as well as the full video: the answer is in that token. Shipped model on
    # these 240 questions: full 1.000, oracle 0.996 (random padding) / 1.000 (other boxes as padding), random 0.30.
    for o in (oracle, boxes):
        assert o["accuracy"] >= full["accuracy"] - 0.03 and o["accuracy"] >= rand["accuracy"] + 0.5, (full, o)
    # the questions about a coloured box (not the white-box prior) are where the tokens matter
    for kind in ("colour", "dots"):
        assert rand[kind] <= 0.5 < full[kind] - 0.35, (kind, full, rand)


def test_answers_stop_after_the_answer_word(adapter: LlavaOnevisionAdapter, questions: list) -> None:
    """The reward path decodes greedily until ``<|im_end|>``: the model must give the one answer word and stop,
    also when a question-aware policy has pruned the video to the asked box plus other boxes (a model trained on
    full tokens only answered "4 D C C" for "4" there)."""
    gen = torch.Generator().manual_seed(0)
    for enc, scene, oracle in questions[:12]:
        (full,) = adapter.generate(enc, None, max_new_tokens=4)
        (pruned,) = adapter.generate(enc, box_padded(scene, oracle, gen)[None], max_new_tokens=4)
        assert full.strip() == scene.answer and pruned.strip() == scene.answer, (scene.question, full, pruned)


def test_blind_test_drops_the_prior_questions(adapter: LlavaOnevisionAdapter, unseen: Path, tmp_path: Path) -> None:
    raw = json.loads((unseen / "test.json").read_text())
    records = load_records(unseen / "test.json").records[:80]
    prior = {r["problem_id"] for r in raw if r["meta"]["prior"]}
    white = {r["problem_id"] for r in raw if " white box " in r["meta"]["question"]}
    summary = run_blind_test(records, adapter, tmp_path / "kept.json", max_new_tokens=4, progress=False)
    kept = {r.sample_id for r in load_records(tmp_path / "kept.json", unseen).records}
    in_sample = prior & {r.sample_id for r in records}
    assert in_sample and not (kept & in_sample), "every question the prior answers is answered without the video"
    against_prior = (white - prior) & {r.sample_id for r in records}
    assert against_prior and against_prior <= kept, "a white box without the prior's dot needs the video"
    others = len(records) - len(in_sample)
    # elsewhere only lucky guesses are dropped: well under half of the non-prior questions
    assert summary.dropped - len(in_sample) < 0.5 * others


def test_prompts_are_in_the_vocabulary_and_templated_once() -> None:
    from transformers import AutoProcessor

    from cacovid_rl.data.prompts import INSTRUCTIONS, chat_text

    processor = AutoProcessor.from_pretrained(ASSET, local_files_only=True)
    tok = processor.tokenizer
    for i in range(40):
        scene = S.sample_scene(np.random.default_rng([9, i]))
        prompt = build_prompt(S.problem_text(scene), scene.problem_type)
        assert prompt.endswith(INSTRUCTIONS[scene.problem_type])
        text = chat_text(processor, prompt)
        assert text.count("<video>") == 1 and text.index("<video>") < text.index(scene.question)
        assert text.rstrip().endswith("<|im_start|>assistant")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)
        assert "<video>" not in chat_text(processor, prompt, video=False)
    for instruction in INSTRUCTIONS.values():  # every problem type's instruction tokenizes without <unk>
        assert tok.unk_token_id not in tok(instruction, add_special_tokens=False)["input_ids"]
