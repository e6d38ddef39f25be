"""Versioned weight broadcast through the Ray object store.

The learner's policy keeps its weights as views into ONE contiguous byte buffer
(``CacovidPolicy.bind_flat_buffer``), and each version is ``ray.put`` once from that buffer (never once per actor,
never once per parameter, and no flatten first: the put is the only copy). Actors read it zero-copy between work items,
verify the checksum and echo the version in every trajectory. The driver keeps references only to
the versions that in-flight work may still need, so the object store cannot fill up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import xxhash

from cacovid_rl.policy.network import flat_checksum as checksum


def state_checksum(module: torch.nn.Module) -> str:
    """:func:`checksum` of the weights a module actually holds, laid out as ``flat_state`` lays them out.

    Hashed tensor by tensor (no second copy of the whole policy), or in one pass over the buffer of a policy whose
    weights are views into one (``CacovidPolicy.bind_flat_buffer``: same bytes, same digest), so an actor can prove
    after every sync that what it will roll out with is the buffer the learner published, not merely that it
    received that buffer.
    """
    bound = module.flat_buffer() if hasattr(module, "flat_buffer") else None
    if bound is not None:  # a bound policy (CacovidPolicy.bind_flat_buffer): the same bytes in one pass
        flat = bound[0].detach()
        return checksum((flat if flat.device.type == "cpu" else flat.cpu()).numpy())
    h = xxhash.xxh3_128()
    for t in module.state_dict().values():
        h.update(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()))
    return h.hexdigest()


@dataclass
class WeightHandle:
    """A published weight version. ``refs`` is a one-element list so Ray does not resolve it eagerly."""

    version: int
    refs: list[ray.ObjectRef]
    checksum: str
    meta: dict[str, Any]
    published_at: float
    nbytes: int

    @classmethod
    def publish(cls, flat: np.ndarray, meta: dict[str, Any], version: int) -> WeightHandle:
        return cls(version, [ray.put(flat)], checksum(flat), meta, time.time(), int(flat.nbytes))

    def fetch(self) -> np.ndarray:
        """Read the buffer (zero-copy from the local object store) and verify it."""
        flat = ray.get(self.refs[0], timeout=300)
        got = checksum(flat)
        if got != self.checksum:
            raise RuntimeError(f"weight version {self.version} failed its checksum ({got} != {self.checksum})")
        return flat


def publish_policy(policy: torch.nn.Module, version: int) -> WeightHandle:
    """Publish ``policy``'s current weights as ``version``: one put of its bound flat buffer when it has one on the
    host (the live weights: the put is the one copy), else one put of a fresh ``flat_state`` (a policy on a GPU: one
    device-to-host copy first; DeepSpeed, which keeps the weights in its own buffers: one flatten first)."""
    bound = policy.flat_buffer() if hasattr(policy, "flat_buffer") else None
    if bound is not None and bound[0].device.type == "cpu":
        flat, meta = bound[0].numpy(), bound[1]
    else:
        flat, meta = policy.flat_state()
    return WeightHandle.publish(flat, meta, version)
