"""Atomic checkpoints without pickle: tensors in safetensors, everything else in msgpack.

Layout of ``<dir>/step_00000120/``::

    policy/                 CacovidPolicy.save_pretrained (safetensors + JSON config)
    optimizer.safetensors   optimizer state tensors + torch RNG state
    state.msgpack           optimizer state skeleton (scalars, groups), scheduler state, driver state
                            (data cursor, weight version, counters, metrics step)
    recent_weights.safetensors  flat weights of the last ``max_staleness`` versions, so that a
                            resumed run re-dispatches in-flight batches with the exact versions

A checkpoint is written to ``step_X.tmp`` and renamed, then ``LATEST`` (a one-line file) is
replaced atomically, so a crash at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

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
    """Write checkpoint ``step`` under ``root`` atomically and prune all but the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
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
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = root / (LATEST + ".tmp")
    latest_tmp.write_text(final.name + "\n")
    latest_tmp.replace(root / LATEST)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (per ``LATEST``), or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(
    path: str | Path, policy, scheduler
) -> tuple[dict[str, Any], dict[str, Any], dict[int, np.ndarray]]:
    """Restore policy/scheduler/RNG in place; returns (driver_state, optimizer_state, recent_weights)."""
    path = Path(path)
    from cacovid_rl.policy.network import CacovidPolicy

    loaded = CacovidPolicy.from_pretrained(path / "policy")
    policy.load_state_dict(loaded.state_dict())
    state = read_file(path / "state.msgpack")
    tensors = load_file(str(path / "optimizer.safetensors"))
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
