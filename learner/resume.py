"""``--resume``: which checkpoint a run continues from, and the refusal to continue a different run under its name."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from cacovid_rl.config import Config
from learner.checkpoint import find_resumable, read_manifest, step_of

log = logging.getLogger("cacovid_rl.driver")


class ResumeError(ValueError):
    """``--resume`` cannot continue this run as asked (no usable checkpoint, a changed config); a user error."""


# What defines a run: resuming with another value would silently train a different run under the old name.
DEFINING_KEYS: tuple[str, ...] = (
    "seed",
    "data.train_path",
    "data.video_root",
    "data.num_frames",
    "data.max_fps",
    "data.allow_outside_video_root",
    "learner.questions_per_step",
    "model.path",
    "model.family",
    "policy",
)


def _lookup(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def config_changes(stored: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...] = DEFINING_KEYS) -> list[str]:
    """``key: old -> new`` for each defining key whose value differs between two config dicts."""
    return [
        f"{k}: {_lookup(stored, k)!r} -> {_lookup(new, k)!r}" for k in keys if _lookup(stored, k) != _lookup(new, k)
    ]


def resume_point(
    cfg: Config, root: Path, resume: bool, resume_or_start: bool, allow_config_change: bool
) -> tuple[Path | None, str]:
    """The checkpoint to resume from (None: start fresh) and the run id (lineage) the new checkpoints carry."""
    if not (resume or resume_or_start):
        others = [p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None]
        if others:
            log.warning(
                "%s already holds %d checkpoints of an earlier run: they are kept (this run only prunes its own); "
                "--resume continues them",
                root,
                len(others),
            )
        return None, uuid.uuid4().hex[:12]
    path, passed = find_resumable(root)
    for name, reason in passed:
        log.warning("--resume: not using %s: %s", name, reason)
    if path is None:
        what = f"no verified checkpoint under {root}" + (f" ({len(passed)} passed over, see above)" if passed else "")
        if resume_or_start:
            log.warning("--resume-or-start: %s, starting fresh", what)
            return None, uuid.uuid4().hex[:12]
        raise ResumeError(
            f"--resume: {what}; check learner.checkpoint_dir, or pass --resume-or-start to start fresh without one"
        )
    manifest = read_manifest(path) or {}
    stored = manifest.get("config") or {}
    changes = config_changes(stored, cfg.to_dict()) if stored else []
    if changes and not allow_config_change:
        raise ResumeError(
            f"--resume from {path} would change what defines the run ({'; '.join(changes)}): resume with the run's "
            "own config (its config.yaml), or pass --allow-config-change"
        )
    if changes:
        log.warning("--allow-config-change: resuming %s with %s", path, "; ".join(changes))
    log.info("resuming from %s", path)
    return path, str(manifest.get("run_id") or uuid.uuid4().hex[:12])
