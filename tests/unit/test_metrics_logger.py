"""MetricsLogger: the JSONL file, and wandb charts that keep evaluations logged after later training steps."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cacovid_rl.config import load_config
from learner.metrics import STEP_KEY, MetricsLogger


class FakeRun:
    """What matters of a wandb run here: it drops any ``step=`` below its current step, as wandb does
    ("Tried to log to step 25 that is less than the current step 34 ... this data will be ignored")."""

    def __init__(self) -> None:
        self.step = 0
        self.kept: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self.step_metrics: dict[str, str | None] = {}

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.step_metrics[name] = step_metric

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        if step is not None and step < self.step:
            self.dropped.append(data)
            return
        self.step = self.step if step is None else step
        self.kept.append(data)

    def finish(self) -> None:
        pass


def test_evaluation_logged_after_later_steps_reaches_wandb(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    run = FakeRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    logger = MetricsLogger(load_config(None, []), tmp_path)
    logger.log({"loss/total": 1.0}, step=34)
    logger.log({"eval/full": 0.9, "nan": float("nan")}, step=25)  # the evaluation of version 25 finishes late
    logger.close()
    assert not run.dropped
    assert {"eval/full": 0.9, STEP_KEY: 25} in run.kept
    assert run.step_metrics["*"] == STEP_KEY  # every chart is drawn against the policy version
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 34, "loss/total": 1.0}, {"step": 25, "eval/full": 0.9}]
