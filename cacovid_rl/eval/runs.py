"""Trained runs for the report: finding the run directories, reading their resolved configs and their metrics.

A run directory is what ``cacovid-rl train`` writes: ``policy/`` (the trained policy), ``metrics.jsonl`` and the
resolved config (``config.yaml``; a wandb run's ``files/config.yaml`` also works). A report takes one run or a
parent of several seeds' runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cacovid_rl.config import Config, ConfigError, from_dict, load_config

log = logging.getLogger("cacovid_rl.report")

CONFIG_FILES = ("config.yaml", "resolved_config.yaml", "config.json")
TRAINING_KEYS = ("reward/token_mean", "reward/frame_mean", "reward/content_mean", "rollout/rate_mean", "loss/total")
"""The training metrics the report summarises as first/last-quarter means."""


@dataclass
class RunInfo:
    name: str
    path: Path
    cfg: Config
    config_source: str
    policy_dir: Path
    metrics_path: Path


def is_run_dir(path: Path) -> bool:
    return (path / "policy" / "policy_config.json").is_file() or (path / "metrics.jsonl").is_file()


def discover_runs(root: str | Path) -> list[Path]:
    """``root`` itself when it is a run directory, else its run subdirectories (two levels deep), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory '{root}' does not exist")
    if is_run_dir(root):
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and is_run_dir(p))
    if not found:
        found = sorted(q for p in root.iterdir() if p.is_dir() for q in p.iterdir() if q.is_dir() and is_run_dir(q))
    if not found:
        raise FileNotFoundError(f"no run directories (with policy/ or metrics.jsonl) under '{root}'")
    return found


def _unwrap_wandb(raw: dict[str, Any]) -> dict[str, Any]:
    """wandb's config.yaml stores ``key: {value: ...}``; keep only the values of config sections."""
    out = {}
    for k, v in raw.items():
        if k.startswith("_") or k == "wandb_version":
            continue
        out[k] = v["value"] if isinstance(v, dict) and "value" in v else v
    return out


def load_run_config(run: Path, fallback: str | Path | None = None) -> tuple[Config, str]:
    """The run's resolved config: ``config.yaml``/``resolved_config.yaml``/``config.json`` in the run directory,
    else the wandb run's ``files/config.yaml``, else ``fallback`` (a YAML config) when given."""
    for name in CONFIG_FILES:
        p = run / name
        if p.is_file():
            raw = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
            return from_dict(raw or {}), str(p)
    for p in sorted(run.glob("wandb/*run-*/files/config.yaml")):
        try:
            return from_dict(_unwrap_wandb(yaml.safe_load(p.read_text()) or {})), str(p)
        except ConfigError as exc:
            log.warning("ignoring %s: %s", p, exc)
    if fallback:
        return load_config(fallback), f"{fallback} (fallback: no resolved config in {run})"
    raise FileNotFoundError(
        f"no resolved config in '{run}' (looked for {', '.join(CONFIG_FILES)} and wandb/*/files/config.yaml); "
        "pass --config with the YAML the run was trained with"
    )


def load_runs(root: str | Path, fallback_config: str | Path | None = None) -> list[RunInfo]:
    runs = []
    for path in discover_runs(root):
        cfg, source = load_run_config(path, fallback_config)
        runs.append(RunInfo(path.name, path, cfg, source, path / "policy", path / "metrics.jsonl"))
    return runs


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (none when it is missing); a torn line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one numeric metric, sorted by step."""
    pts = sorted((r["step"], r[key]) for r in rows if key in r and isinstance(r.get(key), (int, float)))
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)


def training_summary(runs: Sequence[RunInfo]) -> dict[str, Any]:
    """First/last-quarter means of the main training metrics per seed (what the curves show, in numbers)."""
    out: dict[str, Any] = {}
    for run in runs:
        rows = read_metrics(run.metrics_path)
        per: dict[str, Any] = {"updates": int(max((r.get("step", 0) for r in rows), default=0))}
        for k in TRAINING_KEYS:
            _, v = series(rows, k)
            if v.size >= 4:
                q = max(1, v.size // 4)
                per[k] = {"first_quarter": float(v[:q].mean()), "last_quarter": float(v[-q:].mean())}
        evals = {k: series(rows, k) for k in {k for r in rows for k in r if k.startswith("eval/")}}
        per["eval"] = {k: [[float(s), float(x)] for s, x in zip(*sv, strict=True)] for k, sv in sorted(evals.items())}
        out[run.name] = per
    return out
