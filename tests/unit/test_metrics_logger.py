"""MetricsLogger against a real offline wandb run: the JSONL file, and the run file read back record by record."""

from __future__ import annotations

import json

from cacovid_rl.config import load_config
from learner.metrics import STEP_KEY, MetricsLogger
from tests.wandb_io import read_offline_records


def read_wandb_run(out_dir) -> tuple[list[dict], list[tuple[str, str]]]:
    """(history rows, (metric name or glob, step metric) definitions) of the one offline run under ``out_dir``."""
    records = read_offline_records(out_dir)
    history, metrics = [], []
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.append({k: v for k, v in items.items() if not k.startswith("_")})  # wandb's own _step, _runtime
        elif kind == "metric" and not rec.metric.expanded_from_glob:
            metrics.append((rec.metric.name or rec.metric.glob_name, rec.metric.step_metric))
    return history, metrics


def test_evaluation_logged_after_later_steps_reaches_wandb(tmp_path) -> None:
    """wandb drops a ``step=`` below its current step ("Tried to log to step 25 that is less than the current step
    34"); an evaluation of version 25 that finishes after update 34 must still land, drawn against the version."""
    logger = MetricsLogger(load_config(None, ["wandb.mode=offline", "wandb.project=test"]), tmp_path)
    logger.log({"loss/total": 1.0}, step=34)
    logger.log({"eval/full": 0.9, "nan": float("nan")}, step=25)  # the evaluation of version 25 finishes late
    logger.close()
    history, metrics = read_wandb_run(tmp_path)
    assert history == [{"loss/total": 1.0, STEP_KEY: 34}, {"eval/full": 0.9, STEP_KEY: 25}]
    assert ("*", STEP_KEY) in metrics  # every chart is drawn against the policy version
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 34, "loss/total": 1.0}, {"step": 25, "eval/full": 0.9}]
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert len(list(tmp_path.glob(f"wandb/offline-run-*-{run_id}"))) == 1
