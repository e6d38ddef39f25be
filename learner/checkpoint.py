"""Atomic checkpoints without pickle: tensors in safetensors, everything else in msgpack.

Layout of ``<dir>/step_00000120/``::

    policy/                 CacovidPolicy.save_pretrained (safetensors + JSON config)
    optimizer.safetensors   optimizer state tensors + torch RNG state
    state.msgpack           optimizer param groups/scalars, scheduler state, driver state
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


def _split_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in opt_state["state"].items():
        for name, val in st.items():
            key = f"state/{pid}/{name}"
            if torch.is_tensor(val):
                tensors[key] = val.detach().cpu().contiguous()
            else:
                scalars[key] = val
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    items = [(k, v) for k, v in tensors.items() if k.startswith("state/")] + list(meta["scalars"].items())
    for key, val in items:
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def _scheduler_state(scheduler) -> dict[str, Any]:
    # LambdaLR stores its lambdas (functions) in the state dict; they are rebuilt from config.
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def save_checkpoint(
    root: str | Path,
    step: int,
    policy,
    optimizer: torch.optim.Optimizer,
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
    tensors, opt_meta = _split_optimizer(optimizer.state_dict())
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


def load_checkpoint(path: str | Path, policy, optimizer, scheduler) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Restore policy/optimizer/scheduler/RNG in place; returns (driver_state, recent_weights)."""
    path = Path(path)
    from cacovid_rl.policy.network import CacovidPolicy

    loaded = CacovidPolicy.from_pretrained(path / "policy")
    policy.load_state_dict(loaded.state_dict())
    state = read_file(path / "state.msgpack")
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng/torch"))
    optimizer.load_state_dict(_join_optimizer(tensors, state["optimizer"]))
    sched = scheduler.state_dict()
    sched.update(state["scheduler"])
    scheduler.load_state_dict(sched)
    recent: dict[int, np.ndarray] = {}
    rw = path / "recent_weights.safetensors"
    if rw.is_file():
        recent = {int(k[1:]): v for k, v in load_np(str(rw)).items()}
    return state["driver"], recent
