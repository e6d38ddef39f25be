"""Adaptive rate and LR schedule against the official trainer (tests/golden/rate_and_schedule.json)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import cacovid_rl.rl.rollout as rollout_mod
from cacovid_rl.config import Config, LearnerConfig, RolloutConfig
from cacovid_rl.data.records import QARecord
from cacovid_rl.rl.rollout import next_rate, rollout_question, token_accuracy
from cacovid_rl.rl.update import lr_lambda
from cacovid_rl.types import Combinations, PolicyScores, QuestionMemory
from tests.golden_io import load_golden

GOLDEN = load_golden("rate_and_schedule")
RATE_CASES = GOLDEN["adaptive_rate"]["cases"]
LR_CASES = GOLDEN["lr_schedule"]["cases"]
NUM_CONTENT, NUM_TOKEN, NUM_FRAME = 1, 23, 8
MODES = torch.tensor([0] * NUM_CONTENT + [1] * NUM_TOKEN + [2] * NUM_FRAME)


def _memory_step(memory: QuestionMemory, rewards: list[float], rate: float) -> None:
    g = len(rewards)
    memory.append(Combinations(keep=torch.zeros(g, 1, dtype=torch.long), mode=MODES, rate=rate), torch.tensor(rewards))


@pytest.mark.parametrize("case", RATE_CASES, ids=lambda c: c["name"])
def test_adaptive_rate_matches_the_official(case: dict) -> None:
    memory, rate, accuracy, rates, accuracies = QuestionMemory(), case["base_rate"], 0.5, [], []
    for rewards in case["rewards_per_iteration"]:
        rate = next_rate(rate, accuracy, RolloutConfig(), base_rate=case["base_rate"])  # before each iteration
        rates.append(rate)
        _memory_step(memory, rewards, rate)
        accuracy = token_accuracy(memory)
        accuracies.append(accuracy)
    np.testing.assert_allclose(rates, case["official_rates"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(accuracies, case["official_accuracy_after_iteration"], rtol=0, atol=1e-6)


class _Encoded:
    """The parts of an ``EncodedQuestion`` the rollout loop reads."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features
        self.inputs_embeds = torch.zeros(1, 4)

    def video_features(self) -> torch.Tensor:
        return self.features


class _Adapter:
    def __init__(self, t: int, n: int) -> None:
        self.features = torch.randn(t, n, 4, generator=torch.Generator().manual_seed(0))

    def encode(self, frames: np.ndarray, prompt: str) -> _Encoded:
        return _Encoded(self.features)

    def generate(self, enc: _Encoded, keep: torch.Tensor, max_new_tokens: int, **_: object) -> list[str]:
        return [""] * keep.shape[0]


class _Policy:
    def __init__(self, t: int, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.scores = PolicyScores(token=torch.randn(t, n, generator=g), frame=torch.randn(t, generator=g))

    def score(self, enc: _Encoded) -> PolicyScores:
        return self.scores


@pytest.mark.parametrize("case", RATE_CASES, ids=lambda c: c["name"])
def test_rollout_loop_adapts_the_rate_like_the_official(case: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real loop (sampling included), with the LLM's rewards replaced by the scenario's."""
    planned = iter(case["rewards_per_iteration"])
    seen_flags: list[bool] = []

    def fake_rewards(answers: list[str], ground_truth: str, problem_type: str, fix: bool) -> np.ndarray:
        seen_flags.append(fix)
        return np.asarray(next(planned), dtype=np.float32)

    monkeypatch.setattr(rollout_mod, "batch_rewards", fake_rewards)
    cfg = Config()
    sampling = dataclasses.replace(cfg.sampling, rate=case["base_rate"])
    t, n = 8, 196
    rec = QARecord("q", "question", "A", "<answer>A</answer>", "multiple choice", Path("unused.mp4"))
    res = rollout_question(
        _Adapter(t, n), _Policy(t, n), rec, np.zeros((t, 2, 2, 3), np.uint8), sampling, cfg.rollout, cfg.model,
        torch.Generator().manual_seed(0), reward_cfg=dataclasses.replace(cfg.reward, fix_official_bugs=False),
    )  # fmt: skip
    np.testing.assert_allclose(res.memory.rates, case["official_rates"], rtol=0, atol=1e-12)
    assert [m.tolist() for m in res.memory.mode] == [MODES.tolist()] * len(case["official_rates"])
    assert seen_flags == [False] * len(case["official_rates"])  # reward_cfg reaches the rewards


@pytest.mark.parametrize("case", LR_CASES, ids=lambda c: c["name"])
def test_lr_schedule_matches_the_official(case: dict) -> None:
    """The official scheduler is sized for ``items`` steps but stepped ``items x iterations`` times."""
    items, iterations = case["items_per_gpu"], case["iterations_per_item"]
    if case["lr_scheduler_type"] == "cosine":
        cfg = LearnerConfig(schedule="official_cosine", warmup_steps=case["num_warmup_steps"], total_steps=items)
        fn = lr_lambda(cfg, items * iterations, iterations)
    else:  # a formula check of HF's linear schedule: ours sized for the same ``items`` steps, evaluated past its end
        cfg = LearnerConfig(schedule="linear", warmup_steps=case["num_warmup_steps"], total_steps=items)
        fn = lr_lambda(cfg, items)
    got = [fn(s) for s in range(items * iterations)]
    np.testing.assert_allclose(got, case["official_lr_multiplier"], rtol=0, atol=1e-9)


def test_project_schedules_span_the_whole_run() -> None:
    """``cosine`` (the default) and ``linear`` fall once from 1 to 0 over the run's optimiser steps; warmup is
    Hugging Face's ``step / warmup``."""
    total = 20
    cos = lr_lambda(LearnerConfig(schedule="cosine"), total, iterations=5)
    assert cos(0) == 1.0 and cos(total) == pytest.approx(0.0, abs=1e-12) and cos(total + 7) == pytest.approx(0.0)
    values = [cos(s) for s in range(total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    lin = lr_lambda(LearnerConfig(schedule="linear", warmup_steps=4), total)
    assert [lin(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lin(12) == pytest.approx(0.5) and lin(total + 3) == 0.0
    const = lr_lambda(LearnerConfig(schedule="constant", warmup_steps=2), total)
    assert [const(s) for s in (0, 1, 2, 19)] == [0.0, 0.5, 1.0, 1.0]
    official = lr_lambda(LearnerConfig(schedule="official_cosine"), total, iterations=5)
    assert official(4) == pytest.approx(0.0, abs=1e-12) and official(8) == pytest.approx(1.0)  # 4-step cycles
