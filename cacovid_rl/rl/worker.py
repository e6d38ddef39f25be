"""The reward worker: everything a reward actor does, as a plain Ray-free class.

``actors/reward_actor.py`` wraps it in a Ray actor; tests and the single-process trainer use it
directly. A worker hosts the frozen video LLM and a copy of the policy at a known weight version,
and turns work items (one question each) into encoded trajectory messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cacovid_rl.config import Config
from cacovid_rl.data.records import QARecord, parse_record, record_to_dict
from cacovid_rl.data.video import VideoDecodeError, read_frames
from cacovid_rl.models.loading import load_adapter
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.rl.rollout import rollout_question, sample_generator
from cacovid_rl.rl.trajectory import Trajectory


@dataclass(frozen=True)
class WorkItem:
    """One question to roll out: its global data index, learner batch, epoch and record."""

    index: int
    batch_index: int
    epoch: int
    record: dict[str, Any]

    @staticmethod
    def record_to_dict(rec: QARecord) -> dict[str, Any]:
        """The record in the loader's own JSON schema (absolute video path), so one parser reads it back."""
        return record_to_dict(rec)

    def to_record(self) -> QARecord:
        return parse_record(self.record, self.index, Path("/"), check_videos=False)


class RewardWorker:
    """Frozen video LLM + policy copy; rolls out questions at the current weight version."""

    def __init__(self, cfg: Config, actor_id: str = "worker-0") -> None:
        torch.set_num_threads(cfg.cluster.torch_threads)
        self.cfg = cfg
        self.actor_id = actor_id
        self.adapter = load_adapter(cfg.model)
        torch.manual_seed(cfg.seed)
        self.policy = build_policy(cfg, self.adapter).to(self.adapter.device).eval()
        self.version = -1
        self.busy_s = 0.0
        self.started = time.time()

    def set_weights(self, flat: np.ndarray, meta: dict[str, Any], version: int) -> None:
        self.policy.load_flat_state(flat, meta)
        self.version = version

    def run(self, item: WorkItem) -> tuple[dict[str, Any], bytes]:
        """Roll out one question: (small status dict, encoded trajectory or ``b""`` if skipped).

        The status travels separately from the (large) trajectory so the driver can count and route
        results without ever fetching trajectory bytes. A bad record (missing/corrupt video, bad field)
        is reported as ``status="skipped"``, not raised.
        """
        t0 = time.perf_counter()
        status: dict[str, Any] = {
            "index": item.index,
            "batch_index": item.batch_index,
            "sample_id": str(item.record["problem_id"]),
            "actor_id": self.actor_id,
            "weight_version": self.version,
        }
        try:
            rec = item.to_record()
            frames = read_frames(rec.video, self.cfg.data.num_frames, self.cfg.data.max_fps)
            gen = sample_generator(self.cfg.seed, rec.sample_id, item.epoch)
            res = rollout_question(
                self.adapter,
                self.policy,
                rec,
                frames,
                self.cfg.sampling,
                self.cfg.rollout,
                self.cfg.model,
                gen,
                reward_cfg=self.cfg.reward,
            )
            traj = Trajectory.from_rollout(
                res,
                sample_id=rec.sample_id,
                epoch=item.epoch,
                batch_index=item.batch_index,
                weight_version=self.version,
                problem_type=rec.problem_type,
                actor_id=self.actor_id,
            )
            payload = traj.to_bytes()
            status.update(
                status="ok",
                nbytes=len(payload),
                combos=int(traj.num_samples),
                reward_mean=float(np.mean(traj.rewards)),
                timings=traj.timings,
            )
        except (ValueError, OSError, KeyError, VideoDecodeError) as exc:
            payload = b""
            status.update(status="skipped", error=f"{type(exc).__name__}: {exc}")
        elapsed = time.perf_counter() - t0
        self.busy_s += elapsed
        status["elapsed_s"] = elapsed
        return status, payload


def build_policy(cfg: Config, adapter) -> CacovidPolicy:
    """A fresh policy from the LLM (layer-0 init) or one loaded from ``cfg.policy.path``."""
    if cfg.policy.path:
        return CacovidPolicy.from_pretrained(cfg.policy.path)
    return CacovidPolicy.from_adapter(adapter, cfg.policy)
