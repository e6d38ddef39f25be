"""A data-parallel learner group (``learner.num_learners`` > 1) behind the single learner's interface.

Why: one learner device replays 5 optimiser steps of a 7B-width decoder layer over ~6,400 tokens per question, so
somewhere past a few tens of reward GPUs it, not the reward actors, sets the pace (``benchmarks/cluster_simulation.py``
finds where). The group splits each batch's questions over ``W`` ranks that each hold a full replica, and sums the
gradients with ``torch.distributed`` (gloo on CPU, NCCL on GPU; DeepSpeed ZeRO 1/2 partitions the optimizer state
over the ranks when ``learner.backend`` is ``deepspeed``). Each rank fetches its own share of the trajectory payloads,
so the bytes into the learners are spread over the learner nodes too.

Exactness: the loss of a batch is a mean over its questions; each rank computes its share's part of that mean
(``PolicyUpdater.update(total=...)``), the summed gradient is the single learner's gradient (up to float summation
order), and the ranks agree on every data-dependent branch (skip a step without signal, iterations replayed,
non-finite loss) through ``GradientSync``. So the replicas stay identical and ``W`` learners take the steps one
learner takes on the same batches (``tests/unit/test_learner_group.py``).

Roles: :class:`LearnerGroup` is a small coordinator actor with exactly the methods of ``learner_actor.Learner`` that
the driver calls (``resume_state``, ``publish_recent``, ``publish``, ``update``, ``save``, ``save_policy``,
``weights_checksum``), so the driver only chooses which to start (:func:`spawn_learner`). It owns ``W``
:class:`LearnerWorker` actors, placed like the single learner (``learner.placement_resource`` + 1 GPU each). Rank 0
alone publishes each weight version (one put) and writes checkpoints (atomically; with ZeRO 1/2 it writes
every rank's optimizer partition, gathered first), and every rank resumes from the same checkpoint.

A learner worker that dies (node lost, OOM, killed) ends the run: the update in flight fails with
:class:`LearnerGroupError` (the other ranks, blocked in a collective or not, are killed with it), the driver stops,
and the newest checkpoint, written atomically by rank 0 before the failure, is intact; ``--resume`` continues
exactly from it (``tests/ray/test_learner_group.py``). The group does not recover in place: mid-update the
surviving replicas may already have taken some of the batch's optimiser steps, so the only consistent state to
continue from is a checkpoint, and restarting from it is what ``--resume`` does.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayActorError, RayTaskError

from actors.weights import WeightHandle, state_checksum
from cacovid_rl.config import Config, from_dict
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.rl.worker import RolloutStatus
from learner.learner_actor import Learner, UpdateResult, fetch_payloads

log = logging.getLogger(__name__)

# Metrics every rank computes identically (from the summed gradients or the shared schedule): taken from rank 0;
# every other update metric is a rank's share of a batch mean, and the shares add up.
SHARED_METRICS = frozenset({"policy/grad_norm", "learner/lr", "learner/optimizer_steps", "learner/skipped_steps"})


class LearnerGroupError(RuntimeError):
    """A learner rank failed; the group is unusable (resume from the newest checkpoint)."""


@dataclass(frozen=True)
class BatchShare:
    """A rank's share of the batch-wide sums behind the logged rewards, rates, staleness and bytes."""

    trajs: int = 0
    rewards_n: float = 0.0
    rewards_sum: float = 0.0
    rewards_sumsq: float = 0.0
    rate_sum: float = 0.0
    staleness: list[int] = field(default_factory=list)
    bytes: float = 0.0


@dataclass(frozen=True)
class ShardResult:
    """One rank's part of an update (rank -> coordinator); ``lost`` non-empty: no rank updated."""

    version: int
    metrics: dict[str, float] = field(default_factory=dict)
    handle: WeightHandle | None = None
    fresh: int = 0
    share: BatchShare = field(default_factory=BatchShare)
    fetch_s: float = 0.0
    update_s: float = 0.0
    lost: tuple[int, ...] = ()


class TorchGradientSync:
    """``cacovid_rl.rl.update.GradientSync`` over the default ``torch.distributed`` process group."""

    def __init__(self, rank: int, world_size: int, device: str) -> None:
        self.rank = rank
        self.world_size = world_size
        # NCCL reduces CUDA tensors only; gloo reduces host tensors.
        self.device = torch.device(device if device.startswith("cuda") else "cpu")

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        t = values.to(self.device, torch.float64).clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.cpu()

    @torch.no_grad()
    def reduce_gradients(self, params) -> None:
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter this rank's share did not reach still joins the sum
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        # One collective for the whole policy. gloo sums in float32 (no bf16 there, and summing bf16 loses bits);
        # NCCL sums in the gradients' own dtype.
        dtype = grads[0].dtype if self.device.type == "cuda" else torch.float32
        flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's weights to every rank, as raw bytes (any dtype; one collective when the policy is bound)."""
        bound = module.flat_buffer() if hasattr(module, "flat_buffer") else None
        tensors = [bound[0]] if bound is not None else [t for t in module.state_dict().values()]
        for t in tensors:
            raw = t.view(torch.uint8) if t.dtype != torch.uint8 else t
            moved = raw.to(self.device)
            dist.broadcast(moved, src=0)
            if moved.data_ptr() != raw.data_ptr():
                raw.copy_(moved)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerWorker:
    """One rank of the group: a :class:`learner_actor.Learner` whose updater sums gradients with the other ranks."""

    def __init__(self, cfg_dict: dict[str, Any], rank: int, world_size: int) -> None:
        self.cfg_dict = cfg_dict
        self.cfg: Config = from_dict(cfg_dict)
        self.rank = rank
        self.world_size = world_size
        self.learner: Learner | None = None
        torch.set_num_threads(self.cfg.cluster.torch_threads)

    def endpoint(self) -> tuple[str, int]:
        """Where rank 0 listens for the process group (its node's address and a free port there)."""
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, addr: str, port: int, resume_from: str | None) -> dict[str, Any]:
        """Join the process group, build the replica (from the checkpoint when resuming) and make it rank 0's."""
        device = self.cfg.learner.device
        backend = "nccl" if device.startswith("cuda") else "gloo"
        env = {"MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(self.rank), "LOCAL_RANK": "0"}
        os.environ.update(env, WORLD_SIZE=str(self.world_size))  # DeepSpeed reads these
        if addr.startswith("127.") and backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a loopback-only machine (tests, benchmarks)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=self.rank,
            world_size=self.world_size,
            # A rank that stops answering (hung device) fails its collective after this long instead of never.
            timeout=datetime.timedelta(seconds=self.cfg.cluster.call_timeout_s),
        )
        sync = TorchGradientSync(self.rank, self.world_size, device)
        self.learner = Learner(self.cfg_dict, resume_from, sync=sync, publishes=False)
        if not resume_from:  # fresh replicas are built alike from the seed; the broadcast makes that a fact
            sync.broadcast_module(self.learner.updater.policy)
        if self.rank == 0:
            self.learner.publish_initial()  # each version put once, by rank 0 only
        return {"version": self.learner.version, "checksum": state_checksum(self.learner.updater.policy)}

    # -- the single learner's methods, on this rank ----------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        return self.learner.resume_state()

    def publish_recent(self) -> dict[int, WeightHandle]:
        return self.learner.publish_recent()

    def publish(self) -> WeightHandle:
        return self.learner.publish()

    def optimizer_state(self) -> Any:
        return self.learner.updater.optimizer_state()

    def save_with(self, root: str, driver_state: dict[str, Any], optimizer_state: Any) -> str:
        return self.learner.save_with(root, driver_state, optimizer_state)

    def save(self, root: str, driver_state: dict[str, Any]) -> str:
        return self.learner.save(root, driver_state)

    def save_policy(self, out_dir: str) -> str:
        return self.learner.save_policy(out_dir)

    def weights_checksum(self) -> str:
        return self.learner.weights_checksum()

    def replica_checksum(self) -> str:
        """The checksum of the weights this rank holds (every rank must agree with rank 0)."""
        return state_checksum(self.learner.updater.policy)

    def update_shard(self, payload_refs: list[ray.ObjectRef], total: int) -> ShardResult:
        """This rank's share of one update: fetch its payloads, take the group's optimiser steps, bump the version.

        ``total``: fresh trajectories in the whole batch. If any rank lost a payload, no rank updates (they agree
        through one all-reduce) and each returns the positions it lost.
        """
        learner = self.learner
        sync = learner.updater.sync
        t0 = time.perf_counter()
        payloads, lost = fetch_payloads(payload_refs)
        if sync.all_reduce(torch.tensor([float(len(lost))]), "max")[0] > 0:
            return ShardResult(learner.version, lost=tuple(lost))
        trajs = [Trajectory.from_bytes(p) for p in payloads]
        fresh = [t for t in trajs if learner.version - t.weight_version <= self.cfg.learner.max_staleness]
        t1 = time.perf_counter()
        metrics = learner.updater.update(fresh, version=learner.version, total=total) if total else {}
        if learner.publishes and total:  # rank 0's device and throughput (combine_metrics sums the ranks' metrics)
            metrics.update(learner.device_metrics(time.perf_counter() - t0, sum(t.num_samples for t in fresh)))
        learner.version += 1
        learner._remember(learner.version)
        rewards = np.concatenate([t.rewards for t in trajs]).astype(np.float64) if trajs else np.zeros(0)
        share = BatchShare(
            trajs=len(trajs),
            rewards_n=float(rewards.size),
            rewards_sum=float(rewards.sum()),
            rewards_sumsq=float((rewards**2).sum()),
            rate_sum=float(sum(t.rates.mean() for t in trajs)),
            staleness=[learner.version - 1 - t.weight_version for t in trajs],
            bytes=float(sum(len(p) for p in payloads)),
        )
        return ShardResult(
            version=learner.version,
            metrics=metrics,
            handle=learner.publish() if learner.publishes else None,
            fresh=len(fresh),
            share=share,
            fetch_s=t1 - t0,
            update_s=time.perf_counter() - t1,
        )


def shard_batch(weight_versions: Sequence[int], version: int, max_staleness: int, world: int) -> list[list[int]]:
    """Positions of a batch for each rank, given the weight version each question was rolled out with: the fresh
    trajectories (the ones that train) split into contiguous, near-equal runs (rank 0 first, so rank 0 holds some
    whenever any rank does), the stale ones dealt round-robin (they only add to the logged reward and staleness
    figures)."""
    fresh = [i for i, v in enumerate(weight_versions) if version - v <= max_staleness]
    stale = [i for i, v in enumerate(weight_versions) if version - v > max_staleness]
    shards = [list(map(int, part)) for part in np.array_split(np.asarray(fresh, dtype=np.int64), world)]
    for k, i in enumerate(stale):
        shards[k % world].append(i)
    return [sorted(s) for s in shards]


def combine_metrics(results: list[ShardResult], total: int) -> dict[str, float]:
    """The single learner's metrics from the ranks' shares (see :data:`SHARED_METRICS`)."""
    out: dict[str, float] = {}
    for r in results:
        if r.fresh == 0:
            continue
        for k, v in r.metrics.items():
            if k in SHARED_METRICS:
                out.setdefault(k, v)
            elif not (isinstance(v, float) and math.isnan(v)):
                out[k] = out.get(k, 0.0) + v
    parts = [r.share for r in results]
    n = sum(p.rewards_n for p in parts)
    mean = sum(p.rewards_sum for p in parts) / n if n else float("nan")
    var = sum(p.rewards_sumsq for p in parts) / n - mean**2 if n else float("nan")
    trajs = sum(p.trajs for p in parts)
    staleness = [s for p in parts for s in p.staleness]
    update = max(r.update_s for r in results)
    out.update(
        {
            "reward/mean": float(mean),
            "reward/std": float(math.sqrt(max(var, 0.0))) if n else float("nan"),
            "rollout/rate_mean": sum(p.rate_sum for p in parts) / trajs if trajs else float("nan"),
            "policy/staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
            "policy/staleness_max": float(max(staleness, default=0)),
            "data/dropped_stale": float(trajs - total),
            "data/questions": float(total),
            "transfer/bytes_per_question": sum(p.bytes for p in parts) / trajs if trajs else 0.0,
            "timing/learner_fetch": max(r.fetch_s for r in results),
            "timing/learner_update": update,
            "learner/questions_per_s": total / max(1e-9, update),
            "learner/num_learners": float(len(results)),
        }
    )
    return out


class LearnerGroup:
    """The coordinator: the single learner's interface over ``learner.num_learners`` :class:`LearnerWorker` s."""

    def __init__(
        self, cfg_dict: dict[str, Any], resume_from: str | None = None, worker_options: dict[str, Any] | None = None
    ) -> None:
        cfg: Config = from_dict(cfg_dict)
        self.cfg = cfg
        self.world = cfg.learner.num_learners
        self.version = 0
        self.failed = ""
        opts = dict(worker_options or {})
        opts.setdefault("num_cpus", 0)
        opts["max_restarts"] = 0  # a restarted rank would hold a fresh replica: the group ends instead
        opts["max_task_retries"] = 0
        remote = ray.remote(LearnerWorker)
        self.workers = [
            remote.options(**opts, name=f"cacovid-learner-{os.getpid()}-rank{r}").remote(cfg_dict, r, self.world)
            for r in range(self.world)
        ]
        timeout = cfg.cluster.startup_timeout_s
        addr, port = ray.get(self.workers[0].endpoint.remote(), timeout=timeout)
        infos = self._gather([w.setup.remote(addr, port, resume_from) for w in self.workers], "setup", timeout)
        if len({i["checksum"] for i in infos}) != 1 or len({i["version"] for i in infos}) != 1:
            self._abort()
            raise LearnerGroupError(f"learner ranks disagree after setup: {infos}")
        self.version = int(infos[0]["version"])

    # -- failure -----------------------------------------------------------------------------------
    def _abort(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)

    def _gather(self, refs: list[ray.ObjectRef], what: str, timeout: float) -> list[Any]:
        """All ranks' results; the first failure kills every rank (the others may be blocked in a collective
        waiting for it) and raises :class:`LearnerGroupError`."""
        if self.failed:
            raise LearnerGroupError(self.failed)
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                self.failed = f"learner group: {what} timed out after {timeout:.0f}s"
                break
            try:
                ray.get(done[0])
            except (RayActorError, RayTaskError) as exc:
                rank = refs.index(done[0])
                self.failed = (
                    f"learner rank {rank} of {self.world} failed during {what} at version {self.version} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the group stops. "
                    "The newest checkpoint is intact: continue with --resume."
                )
                break
        if self.failed:
            log.error(self.failed)
            self._abort()
            raise LearnerGroupError(self.failed)
        return ray.get(refs)

    def _rank0(self, method: str, *args: Any) -> Any:
        ref = getattr(self.workers[0], method).remote(*args)
        return self._gather([ref], method, self.cfg.cluster.call_timeout_s)[0]

    # -- the single learner's interface --------------------------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        return self._rank0("resume_state")

    def publish_recent(self) -> dict[int, WeightHandle]:
        return self._rank0("publish_recent")

    def publish(self) -> WeightHandle:
        return self._rank0("publish")

    def update(self, statuses: list[RolloutStatus], payload_refs: list[ray.ObjectRef]) -> UpdateResult:
        """One policy update of the whole group on one batch (see ``Learner.update``); rank 0's handle."""
        lag = self.cfg.learner.max_staleness
        versions = [s.weight_version for s in statuses]
        shards = shard_batch(versions, self.version, lag, self.world)
        total = sum(1 for v in versions if self.version - v <= lag)
        refs = [
            w.update_shard.remote([payload_refs[i] for i in shard], total)
            for w, shard in zip(self.workers, shards, strict=True)
        ]
        results: list[ShardResult] = self._gather(refs, "update", self.cfg.cluster.call_timeout_s)
        if any(r.lost for r in results):
            lost = sorted(shard[p] for r, shard in zip(results, shards, strict=True) for p in r.lost)
            return UpdateResult(self.version, lost=tuple(lost))
        if len({r.version for r in results}) != 1:
            self._abort()
            raise LearnerGroupError(f"learner ranks disagree on the version: {[r.version for r in results]}")
        self.version = results[0].version
        return UpdateResult(self.version, combine_metrics(results, total), results[0].handle)

    def save(self, root: str, driver_state: dict[str, Any]) -> str:
        """Rank 0 writes the checkpoint (atomically); with ZeRO 1/2 every rank's optimizer partition goes in it."""
        lc = self.cfg.learner
        if lc.backend == "deepspeed" and lc.zero_stage >= 1:
            parts = self._gather([w.optimizer_state.remote() for w in self.workers], "save", 10 * 60.0)
            return self._rank0("save_with", root, driver_state, {"ranks": parts})
        return self._rank0("save", root, driver_state)

    def save_policy(self, out_dir: str) -> str:
        return self._rank0("save_policy", out_dir)

    def weights_checksum(self) -> str:
        return self._rank0("weights_checksum")

    def replica_checksums(self) -> list[str]:
        """Every rank's own weights' checksum (diagnostics and tests: data parallelism keeps them equal)."""
        return self._gather([w.replica_checksum.remote() for w in self.workers], "checksum", 600.0)

    def worker_names(self) -> list[str]:
        return [f"cacovid-learner-{os.getpid()}-rank{r}" for r in range(self.world)]


def spawn_learner(cfg: Config, resume_from: str | None, options: dict[str, Any]) -> Any:
    """The learner actor the driver talks to: today's single ``Learner`` (``options``: its placement) or, with
    ``learner.num_learners`` > 1, a :class:`LearnerGroup` whose ranks each get ``options``. The coordinator needs
    no resources and is pinned to the caller's node (the driver's: the head on a cluster, which outlives the
    others), so it never lands on a reward node the autoscaler may remove."""
    if cfg.learner.num_learners <= 1:
        return ray.remote(Learner).options(**options).remote(cfg.to_dict(), resume_from)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return (
        ray.remote(LearnerGroup)
        .options(num_cpus=0, max_restarts=0, scheduling_strategy=here)
        .remote(cfg.to_dict(), resume_from, options)
    )
