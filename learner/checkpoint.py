"""Atomic checkpoints without pickle: tensors in safetensors, everything else in msgpack.

Layout of ``<dir>/step_00000120/``::

    policy/                 CacovidPolicy.save_pretrained (safetensors + JSON config)
    optimizer.safetensors   optimizer state tensors + torch RNG state
    state.msgpack           optimizer state skeleton (scalars, groups), scheduler state, driver state
                            (data cursor, weight version, counters, metrics step)
    recent_weights.safetensors  flat weights of the last ``max_staleness`` versions, so that a
                            resumed run re-dispatches in-flight batches with the exact versions

    manifest.json           written last: sha256 and size of every file above, the step, the run id (lineage)
                            and the run's defining config

A checkpoint is written to ``step_X.tmp`` and renamed, then ``LATEST`` (the checkpoint's name, then the run
id) is replaced atomically, so a crash at any point leaves the previous checkpoint intact. A checkpoint is only
trusted once its manifest verifies: ``find_resumable`` walks back from ``LATEST`` to the newest one that does
and names each one it passed over. Pruning only ever deletes older checkpoints of the run that writes, so a new
run in a directory that holds another run's (higher-numbered) steps neither deletes those nor its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

from cacovid_rl.wire import read_file, write_file

LATEST = "LATEST"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"step_(\d+)")
log = logging.getLogger(__name__)


class CheckpointError(OSError):
    """A checkpoint cannot be written, read or trusted; the message names the directory or file and why."""


def flatten_tensors(obj: Any, prefix: str = "t") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested dict/list structure into a msgpack-able skeleton and a flat dict of tensors."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if torch.is_tensor(o):
            tensors[path] = o.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(o, dict):
            return {"__dict__": [[k, walk(v, f"{path}/{k}")] for k, v in o.items()]}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(o)]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot checkpoint a {type(o).__name__} at '{path}' without pickle")

    return walk(obj, prefix), tensors


def unflatten_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        return {k: unflatten_tensors(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_tensors(v, tensors) for v in skeleton]
    return skeleton


def _scheduler_state(scheduler) -> dict[str, Any]:
    # LambdaLR stores its lambdas (functions) in the state dict; they are rebuilt from config.
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def save_checkpoint(
    root: str | Path,
    step: int,
    policy,
    optimizer_state: dict[str, Any],
    scheduler,
    driver_state: dict[str, Any],
    recent_weights: dict[int, np.ndarray] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and prune this run's older ones down to ``keep``.

    ``driver_state["run_id"]`` (when the driver sets it) is the checkpoint's lineage and ``driver_state["config"]``
    the config it was written under; both go into the manifest, which the driver reads without loading tensors.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_contents(tmp, step, policy, optimizer_state, scheduler, driver_state, recent_weights)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written .tmp is never read, but it holds disk space
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    run_id = str(driver_state.get("run_id", ""))
    latest_tmp = root / (LATEST + ".tmp")
    latest_tmp.write_text(final.name + "\n" + (f"run {run_id}\n" if run_id else ""))
    latest_tmp.replace(root / LATEST)
    prune(root, run_id, keep, step)
    return final


def _write_contents(
    tmp: Path,
    step: int,
    policy,
    optimizer_state: dict[str, Any],
    scheduler,
    driver_state: dict[str, Any],
    recent_weights: dict[int, np.ndarray] | None,
) -> None:
    policy.save_pretrained(tmp / "policy")
    opt_meta, tensors = flatten_tensors(optimizer_state, "optimizer")
    tensors["rng/torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    if recent_weights:
        save_np(
            {f"v{v}": np.ascontiguousarray(w) for v, w in recent_weights.items()},
            str(tmp / "recent_weights.safetensors"),
        )
    write_file(
        tmp / "state.msgpack",
        {"step": step, "optimizer": opt_meta, "scheduler": _scheduler_state(scheduler), "driver": driver_state},
    )
    files = {
        str(f.relative_to(tmp)): {"sha256": _sha256(f), "bytes": f.stat().st_size}
        for f in sorted(tmp.rglob("*"))
        if f.is_file()
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "run_id": str(driver_state.get("run_id", "")),
        "config": driver_state.get("config", {}),
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    # Durable before the rename publishes it: a power cut must not leave a renamed directory of empty files.
    for f in (*(tmp / name for name in files), tmp / MANIFEST):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def step_of(path: Path) -> int | None:
    """The step number of a ``step_NNNNNNNN`` directory name, or None for anything else (``.tmp`` included)."""
    m = _STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint's manifest, or None when it has none or it is not a JSON object."""
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (naming the file), or None when every file checks out."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    manifest = read_manifest(path)
    if manifest is None:
        return f"{path / MANIFEST} is missing or unreadable (an unfinished or pre-manifest checkpoint)"
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
        return f"{path / MANIFEST} is not a format-{MANIFEST_FORMAT} manifest"
    for name, meta in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != meta.get("bytes"):
            return f"{f} has {f.stat().st_size} bytes, the manifest says {meta.get('bytes')}"
        if _sha256(f) != meta.get("sha256"):
            return f"{f} does not match its checksum (corrupt)"
    return None


def read_latest(root: str | Path) -> tuple[str, str] | None:
    """``LATEST`` as (checkpoint name, run id); None when there is no pointer."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    lines = pointer.read_text(errors="replace").splitlines()
    name = lines[0].strip() if lines else ""
    run_id = next((ln.split(" ", 1)[1].strip() for ln in lines[1:] if ln.startswith("run ")), "")
    return name, run_id


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (per ``LATEST``), or None."""
    latest = read_latest(root)
    if latest is None or not latest[0]:
        return None
    path = Path(root) / latest[0]
    return path if path.is_dir() else None


def find_resumable(root: str | Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """The newest checkpoint under ``root`` that verifies, and ``(name, reason)`` for each one passed over.

    ``LATEST``'s target comes first; then the other ``step_*`` directories, newest first, of the same run when
    ``LATEST`` names one (another run's checkpoints in the same directory are never resumed by accident).
    """
    root = Path(root)
    latest = read_latest(root)
    skipped: list[tuple[str, str]] = []
    candidates: list[Path] = []
    lineage = ""
    if latest is not None:
        name, lineage = latest
        target = root / name
        if step_of(target) is None or not target.is_dir():
            skipped.append((f"{LATEST} -> {name or '(empty)'}", f"{root / LATEST} points at no checkpoint"))
        else:
            candidates.append(target)
    others = sorted((p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None), key=step_of)
    for p in reversed(others):
        if p in candidates:
            continue
        if lineage and (read_manifest(p) or {}).get("run_id") != lineage:
            continue
        candidates.append(p)
    for p in candidates:
        reason = verify_checkpoint(p)
        if reason is None:
            return p, skipped
        skipped.append((p.name, reason))
    return None, skipped


def prune(root: str | Path, run_id: str, keep: int, newest: int) -> list[Path]:
    """Delete this run's checkpoints older than its newest ``keep`` (up to step ``newest``); returns them.

    Only checkpoints whose manifest names ``run_id`` are candidates, and none above ``newest``: another run's
    checkpoints, a newer one this run did not write and pre-manifest ones are left alone.
    """
    root = Path(root)
    mine = sorted(
        (
            p
            for p in root.glob("step_*")
            if p.is_dir()
            and step_of(p) is not None
            and step_of(p) <= newest
            and (read_manifest(p) or {}).get("run_id", None) == run_id
        ),
        key=step_of,
    )
    doomed = mine[:-keep] if keep > 0 else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def check_writable(root: str | Path, key: str = "learner.checkpoint_dir") -> None:
    """Fail now, naming ``key``, if checkpoints cannot be written under ``root`` (not at the first save, hours in)."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"{key} '{root}' is not writable ({exc.strerror or exc}): fix its permissions") from exc


def load_checkpoint(
    path: str | Path, policy, scheduler
) -> tuple[dict[str, Any], dict[str, Any], dict[int, np.ndarray]]:
    """Restore policy/scheduler/RNG in place; returns (driver_state, optimizer_state, recent_weights)."""
    path = Path(path)
    from cacovid_rl.policy.network import CacovidPolicy

    try:
        loaded = CacovidPolicy.from_pretrained(path / "policy")
        policy.load_state_dict(loaded.state_dict())
    except Exception as exc:  # safetensors' own errors name no file
        raise CheckpointError(f"checkpoint policy {path / 'policy'} cannot be loaded: {exc}") from exc
    state = read_file(path / "state.msgpack")
    try:
        tensors = load_file(str(path / "optimizer.safetensors"))
    except Exception as exc:
        raise CheckpointError(f"{path / 'optimizer.safetensors'} cannot be loaded: {exc}") from exc
    torch.set_rng_state(tensors.pop("rng/torch"))
    optimizer_state = unflatten_tensors(state["optimizer"], tensors)
    sched = scheduler.state_dict()
    sched.update(state["scheduler"])
    scheduler.load_state_dict(sched)
    recent: dict[int, np.ndarray] = {}
    rw = path / "recent_weights.safetensors"
    if rw.is_file():
        recent = {int(k[1:]): v for k, v in load_np(str(rw)).items()}
    return state["driver"], optimizer_state, recent
