"""Checks that need the filesystem, run before anything starts (no Ray, no model weights loaded).

``Config.validate`` range-checks values; what it cannot see is whether the paths name usable things. Each of
these failed late before: a typo in ``data.eval_path`` at the first periodic evaluation (in the 7B config after
~1000 updates), an unknown baseline inside the evaluation task, a bad model directory inside a Ray actor's
constructor, a read-only checkpoint directory at the first save. Every failure is a ``ConfigError`` naming the
key and the file (the CLI prints it as one ``error:`` line and exits 2).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from cacovid_rl.config import Config, ConfigError
from cacovid_rl.data.records import DataError, LoadReport, load_records

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def check_model_dir(path_value: str, key: str = "model.path") -> Path:
    """The checkpoint directory of ``model.path``, after a cheap look at what loading would need.

    ``config.json`` must name a supported family and each ``*.safetensors`` file must start with a valid header
    (8-byte length + JSON), which is what a file of random bytes or a truncated download fails.
    """
    from cacovid_rl.models.loading import ModelLoadError, detect_family, resolve_model_path

    try:
        path = resolve_model_path(path_value)
        detect_family(path)
    except ModelLoadError as exc:
        raise ConfigError(f"config key '{key}': {exc}") from exc
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("*.bin")):
        raise ConfigError(f"config key '{key}': '{path}' holds no *.safetensors or *.bin weights")
    for f in weights:
        problem = _safetensors_header_problem(f)
        if problem:
            raise ConfigError(f"config key '{key}': weight file '{f}' {problem}: re-download or re-save the model")
    return path


def _safetensors_header_problem(f: Path) -> str:
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "is truncated"
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_SAFETENSORS_HEADER or n > f.stat().st_size - 8:
                return "has no valid safetensors header"
            header = json.loads(fh.read(n))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except ValueError:
        return "has no valid safetensors header"
    return "" if isinstance(header, dict) else "has no valid safetensors header"


def check_records(cfg: Config, key: str, path_value: str) -> LoadReport:
    """Parse the whole records file of ``key`` once; an unusable file or one with no usable record is an error."""
    p = Path(path_value)
    if not p.is_file():
        raise ConfigError(f"config key '{key}': records file '{p}' does not exist")
    try:
        report = load_records(p, cfg.data.video_root, allow_outside_root=cfg.data.allow_outside_video_root)
    except DataError as exc:
        raise ConfigError(f"config key '{key}': {exc}") from exc
    if not report.records:
        first = f"; first problem: {report.errors[0]}" if report.errors else ""
        raise ConfigError(
            f"config key '{key}': '{p}' has no usable record ({report.summary()}){first}; check it and data.video_root"
        )
    return report


def preflight(cfg: Config, *, train: bool = True) -> LoadReport | None:
    """Every filesystem check for a run of ``cfg``; returns the training records' report (``train``)."""
    if cfg.data.video_root and not Path(cfg.data.video_root).is_dir():
        raise ConfigError(f"config key 'data.video_root': '{cfg.data.video_root}' is not a directory")
    check_model_dir(cfg.model.path)
    if cfg.policy.path and not Path(cfg.policy.path, "policy_config.json").is_file():
        raise ConfigError(f"config key 'policy.path': '{cfg.policy.path}' is not a saved policy directory")
    from cacovid_rl.eval.evaluate import check_methods

    try:
        check_methods(cfg.eval.baselines)
    except ValueError as exc:
        raise ConfigError(f"config key 'eval.baselines': {exc}") from exc
    report = check_records(cfg, "data.train_path", cfg.data.train_path) if train else None
    if cfg.data.eval_path:
        check_records(cfg, "data.eval_path", cfg.data.eval_path)
    return report
