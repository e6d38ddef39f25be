"""The tiny-VLM recipe: training reproduces from the seed, phase 2's pruning draw, the command line.

Outside the default test run (``testpaths = ["tests"]``): ``python -m pytest research/tiny_vlm/tests -x -q``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cacovid_rl.data import synthetic as S
from cacovid_rl.models.loading import TINY_ASSET
from research.tiny_vlm import train as cli
from research.tiny_vlm.data import EncodedSet
from research.tiny_vlm.losses import pruned_keep
from research.tiny_vlm.model import TinyVLMSpec, build_tiny_vlm, load_tiny_vlm, recipe_adapter
from research.tiny_vlm.scenes import Stage
from research.tiny_vlm.settings import PrunedStage, TrainSettings
from research.tiny_vlm.training import train_tiny_vlm


def test_training_is_deterministic_from_the_seed(tmp_path: Path) -> None:
    """Both phases reproduce bit for bit from the seed, and phase 2 started from a saved phase-1 checkpoint
    (``--init-from``, how the shipped checkpoint was finished) gives the same weights as one run of both."""
    data = tmp_path / "data"
    S.make_synthetic(data, n=30, seed=5)
    settings = TrainSettings(
        steps=4,
        batch_size=4,
        curriculum=(Stage(1, 0, 0, asked_span=8, text_only=False), Stage(1, 1, 2, asked_span=2)),
        curriculum_size=8,
        text_only_every=2,
        eval_every=2,
        eval_size=4,
        attention_layer=0,  # the one layer of this spec: the auxiliary attention loss runs too
        pruned=PrunedStage(steps=3, warmup_steps=1),
    )
    spec = TinyVLMSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)

    def no_secs(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "secs"} for h in history]

    reports = {}
    for run in ("a", "b"):
        reports[run] = train_tiny_vlm(data, tmp_path / run, seed=3, spec=spec, settings=settings)
    phase1 = dataclasses.replace(settings, pruned=PrunedStage(steps=0))
    train_tiny_vlm(data, tmp_path / "phase1", seed=3, spec=spec, settings=phase1)
    reports["c"] = train_tiny_vlm(
        data, tmp_path / "c", seed=3, spec=spec, settings=settings, init_from=tmp_path / "phase1"
    )
    assert [h["stage"] for h in reports["a"]["history"]] == [1, "train split", "pruned inputs", "pruned inputs"]
    assert no_secs(reports["a"]["history"]) == no_secs(reports["b"]["history"]) == no_secs(reports["c"]["history"])
    weights = {run: load_file(str(tmp_path / run / "model.safetensors")) for run in ("a", "b", "c", "phase1")}
    for run in ("b", "c"):
        assert weights[run].keys() == weights["a"].keys()
        assert all(torch.equal(weights["a"][k], weights[run][k]) for k in weights["a"]), run
    assert not all(torch.equal(weights["a"][k], weights["phase1"][k]) for k in weights["a"]), "phase 2 trains"
    model, processor = load_tiny_vlm(tmp_path / "a")  # the saved layout loads back offline
    assert model.config.text_config.hidden_size == 32 and not model.training
    assert type(processor).__name__ == "LlavaOnevisionProcessor"
    acc = reports["a"]["test_accuracy_10pct"]
    assert set(acc) == {"full", "random", "uniform", "oracle", "oracle_boxes", "saliency", "text_only_prior"}
    assert all(0.0 <= a["accuracy"] <= 1.0 for k, a in acc.items() if k != "text_only_prior")


def test_built_model_has_the_shipped_architecture_and_stays_trainable() -> None:
    """The recipe's model is the shipped one's architecture, and the library adapter over it leaves it trainable."""
    model, processor = build_tiny_vlm(seed=0)
    shipped = load_tiny_vlm(TINY_ASSET)[0].config
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "video_token_id"):
        assert getattr(model.config, key) == getattr(shipped, key), key
    assert model.config.text_config.hidden_size == shipped.text_config.hidden_size
    assert model.config.text_config.vocab_size == shipped.text_config.vocab_size
    recipe_adapter(model, processor)
    assert all(p.requires_grad for p in model.parameters())


def test_pruned_keep_holds_the_asked_box_and_pads_with_boxes() -> None:
    data = EncodedSet(
        frames=torch.zeros(1, 8, 4, 4, 3, dtype=torch.uint8),
        prompts=["q"],
        prompt_ids=[[0]],
        text_only_ids=[[0]],
        answers=["red"],
        answer_ids=torch.tensor([0]),
        problem_types=["multiple choice"],
        oracle=[[5, 21, 37]],
        prior=torch.tensor([False]),
        boxes=[[5, 21, 37, 60, 61, 90]],
    )
    gen = torch.Generator().manual_seed(0)
    for must, budget in ((1, 4), (2, 6), (None, 12), (3, 2)):
        keep = pruned_keep(data, 0, budget, 128, must, gen, box_padding=1.0)
        assert keep.numel() == budget and keep.unique().numel() == budget
        n_must = min(budget, 3 if must is None else must)
        assert set(keep[:n_must].tolist()) <= {5, 21, 37}
        if budget >= 6:
            assert {60, 61, 90} <= set(keep.tolist()), "other boxes come first as padding"
    keep = pruned_keep(data, 0, 12, 128, 1, gen, box_padding=0.0)
    assert keep.numel() == 12 and len({5, 21, 37} & set(keep.tolist())) >= 1


def test_command_line_overrides_and_errors() -> None:
    stages = '[{"steps": 3, "min_per_frame": 1, "max_per_frame": 2}]'
    args = cli.parser().parse_args(["--steps", "7", "--layers", "2", "--pruned-steps", "0", "--curriculum", stages])
    settings, spec = cli.settings_from_args(args), cli.spec_from_args(args)
    assert (settings.steps, settings.pruned.steps, settings.lr) == (7, 0, TrainSettings().lr)
    assert settings.curriculum == (Stage(3, 1, 2),)
    assert (spec.num_layers, spec.hidden_size) == (2, TinyVLMSpec().hidden_size)
    with pytest.raises(SystemExit, match="--curriculum must be a JSON list"):
        cli.settings_from_args(cli.parser().parse_args(["--curriculum", '[{"steps": 3, "colour": 1}]']))
    with pytest.raises(SystemExit, match="--curriculum must be a JSON list"):
        cli.settings_from_args(cli.parser().parse_args(["--curriculum", "three stages"]))


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    s = TrainSettings(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.05)
    assert [s.lr_at(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert s.lr_at(10) == pytest.approx(1.0) and s.lr_at(60) == pytest.approx(0.05 + 0.95 * 0.5)
    assert s.lr_at(110) == pytest.approx(0.05) and s.lr_at(500) == pytest.approx(0.05)
    assert np.all(np.diff([s.lr_at(i) for i in range(10, 111)]) <= 0)
