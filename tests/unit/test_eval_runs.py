"""Run discovery for the report (``eval/runs.py``): which directories are runs, their resolved configs (own file,
wandb's, or a fallback), their metrics and the training summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cacovid_rl.config import load_config
from cacovid_rl.eval import runs as RU

DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug_local.yaml"


def write_run(path: Path, seed: int, with_config: bool = True) -> Path:
    """A run directory as ``cacovid-rl train`` leaves it: a policy stub, the resolved config and 40 updates of
    metrics (token reward 0.3 + 0.001 * step) with one periodic evaluation at step 40."""
    (path / "policy").mkdir(parents=True)
    (path / "policy" / "policy_config.json").write_text("{}")
    if with_config:
        cfg = load_config(DEBUG_CONFIG, [f"seed={seed}"])
        (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    rows = [
        {
            "step": s,
            "reward/token_mean": 0.3 + 0.001 * s,
            "reward/frame_mean": 0.5,
            "rollout/rate_mean": 0.0625,
            "loss/total": -0.001,
            "loss/token": -0.001,
            "loss/frame": 0.0,
        }
        for s in range(1, 41)
    ]
    rows.append({"step": 40, "eval/cacovid@0.1": 0.6, "eval/uniform@0.1": 0.4, "eval/full": 0.7})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_discover_and_load_runs(tmp_path: Path) -> None:
    for s in (2, 0, 1):
        write_run(tmp_path / f"seed{s}", s)
    (tmp_path / "notes").mkdir()
    assert [p.name for p in RU.discover_runs(tmp_path)] == ["seed0", "seed1", "seed2"]
    assert RU.discover_runs(tmp_path / "seed1") == [tmp_path / "seed1"]
    runs = RU.load_runs(tmp_path)
    assert [r.cfg.seed for r in runs] == [0, 1, 2] and runs[0].config_source.endswith("config.yaml")
    assert runs[1].policy_dir == tmp_path / "seed1" / "policy"
    with pytest.raises(FileNotFoundError, match="no run directories"):
        RU.discover_runs(tmp_path / "notes")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RU.discover_runs(tmp_path / "nowhere")


def test_runs_two_levels_down(tmp_path: Path) -> None:
    write_run(tmp_path / "sweep" / "seed3", 3)
    assert RU.discover_runs(tmp_path) == [tmp_path / "sweep" / "seed3"]


def test_run_config_from_wandb_or_fallback(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", 0, with_config=False)
    with pytest.raises(FileNotFoundError, match="no resolved config"):
        RU.load_run_config(run)
    cfg, source = RU.load_run_config(run, DEBUG_CONFIG)
    assert "fallback" in source and cfg.model.path == "tiny"
    files = run / "wandb" / "offline-run-1" / "files"
    files.mkdir(parents=True)
    raw = load_config(DEBUG_CONFIG, ["seed=7"]).to_dict()
    wandb_cfg = {"wandb_version": 1, "_wandb": {"value": {}}, **{k: {"value": v} for k, v in raw.items()}}
    (files / "config.yaml").write_text(yaml.safe_dump(wandb_cfg))
    cfg, source = RU.load_run_config(run)
    assert cfg.seed == 7 and source.endswith("files/config.yaml")


def test_metrics_skip_a_torn_line_and_sort_by_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "a": 0.5}\n{"step": 1, "a": 0.25, "b": "text"}\n{"step": 3, "a"\n\n')
    rows = RU.read_metrics(path)
    assert rows == [{"step": 2, "a": 0.5}, {"step": 1, "a": 0.25, "b": "text"}]
    steps, values = RU.series(rows, "a")
    assert steps.tolist() == [1.0, 2.0] and values.tolist() == [0.25, 0.5]
    assert RU.series(rows, "b")[0].size == 0  # not numeric
    assert RU.read_metrics(tmp_path / "missing.jsonl") == []


def test_training_summary_quarters(tmp_path: Path) -> None:
    run = RU.load_runs(write_run(tmp_path / "seed0", 0))[0]
    per = RU.training_summary([run])["seed0"]
    token = 0.3 + 0.001 * np.arange(1, 41)  # 40 values: the quarters are the first and last 10
    assert per["updates"] == 40
    assert per["reward/token_mean"]["first_quarter"] == pytest.approx(token[:10].mean())
    assert per["reward/token_mean"]["last_quarter"] == pytest.approx(token[-10:].mean())
    assert "reward/content_mean" not in per  # not logged
    assert per["eval"] == {
        "eval/cacovid@0.1": [[40.0, 0.6]],
        "eval/full": [[40.0, 0.7]],
        "eval/uniform@0.1": [[40.0, 0.4]],
    }
