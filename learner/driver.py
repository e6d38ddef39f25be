"""The training driver: sample -> score -> update -> sync weights -> evaluate -> log.

Scheduling model (a deterministic bounded-staleness pipeline):
- The data is an endless, seeded sequence of questions cut into learner batches of
  ``learner.questions_per_step``. Batch ``b`` is rolled out with weight version ``max(0, b - L)``
  (``L = learner.max_staleness``) and the learner consumes batches strictly in order, so update
  ``b`` produces version ``b + 1``.
- Reward actors therefore run up to ``L`` batches ahead of the learner with no lock-step barrier
  inside the window, and which actor took which question never changes the result: every question's
  RNG derives from (seed, sample, epoch). A re-dispatched question (dead or hung actor) gives the
  same trajectory, and ``--resume`` reproduces an uninterrupted run.

Failure containment (what a 40-hour run must survive without an operator):
- An item's own failure comes back from its actor as a ``skipped`` status with a reason. A call that hangs past
  ``cluster.call_timeout_s``, kills its actor or raises in the actor counts a strike against the item that was
  running; after ``cluster.max_item_failures`` strikes the item is quarantined (skipped, counted, named) instead of
  being re-dispatched again, so no record can stall training.
- Everything that can be checked before Ray starts is (``cacovid_rl.preflight``, the checkpoint directory's
  writability, the resumed checkpoint's checksums and config), so an operator mistake costs seconds, not hours.
- A periodic checkpoint that fails is retried at the next one; the final and the stop checkpoint must succeed
  (``CheckpointError`` otherwise). A local Ray instance runs in its own session, so a signal sent to the driver's
  process group (``timeout``, a supervisor, ``kill -- -PGID``) reaches the driver, which checkpoints, and not the
  raylet it needs to do so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import yaml
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cacovid_rl.config import Config, ConfigError
from cacovid_rl.preflight import preflight
from cacovid_rl.rl.worker import WorkItem
from learner.checkpoint import (
    CheckpointError,
    check_writable,
    find_resumable,
    latest_checkpoint,
    read_manifest,
    step_of,
)
from learner.learner_group import spawn_learner
from learner.metrics import MetricsLogger
from learner.monitoring import ClusterMonitor, log_samples
from learner.pool import ActorPool
from learner.weights import WeightHandle

log = logging.getLogger("cacovid_rl.driver")


def init_ray(cfg: Config) -> bool:
    """Connect to (or start) Ray. Returns True when this call started a local instance."""
    if ray.is_initialized():
        return False
    if cfg.cluster.address == "local" and not os.environ.get("RAY_ADDRESS"):
        # Loopback only: Ray binds to 127.0.0.1 with this set (environment.md).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        with _ray_processes_in_own_session():
            ray.init(
                address="local",  # a new instance, never another session's cluster on this machine
                num_cpus=cfg.cluster.num_cpus,
                object_store_memory=cfg.cluster.object_store_memory_mb * 1024 * 1024,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        return True
    ray.init(address=None if cfg.cluster.address == "local" else cfg.cluster.address, logging_level=logging.WARNING)
    return False


@contextlib.contextmanager
def _ray_processes_in_own_session():
    """Start the local Ray instance's processes (raylet, GCS, ...) in a session of their own.

    They used to share the driver's process group, so the SIGTERM that ``timeout``, a supervisor or
    ``kill -- -PGID`` sends to the group killed the raylet while the driver was writing its stop checkpoint
    (lost in 2 of 3 tries). Ray does the same on Windows; on Linux it only blocks SIGINT in its children. Their
    life stays tied to the driver: Ray's kernel fate sharing (``PR_SET_PDEATHSIG``) ends them when the driver dies,
    and it is the condition for doing this at all. Ray-internal, so any mismatch leaves Ray's own behaviour.
    """
    try:
        from ray._private import services
        from ray._private.utils import detect_fate_sharing_support
    except ImportError:
        yield
        return
    base = getattr(services, "ConsolePopen", None)
    if base is None or not sys.platform.startswith("linux") or not detect_fate_sharing_support():
        yield
        return

    class _OwnSessionPopen(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = _OwnSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = base


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


class DataCursor:
    """Global question index -> (epoch, record): a fresh seeded permutation per epoch."""

    def __init__(self, records: list, seed: int) -> None:
        if not records:
            raise ValueError("no usable training records: check data.train_path and data.video_root")
        self.records = records
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def item(self, index: int, batch_index: int) -> dict[str, Any]:
        n = len(self.records)
        epoch = index // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
        rec = self.records[int(self._perms[epoch][index % n])]
        return {"index": index, "batch_index": batch_index, "epoch": epoch, "record": WorkItem.record_to_dict(rec)}


@dataclass
class Counters:
    dispatched: int = 0
    redispatched: int = 0
    consumed: int = 0
    skipped: int = 0
    duplicates: int = 0
    actor_failures: int = 0
    hung_restarts: int = 0
    lost_payloads: int = 0
    quarantined: int = 0
    checkpoint_failures: int = 0
    eval_failures: int = 0
    consumed_indices: list[int] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    """Items skipped during training, by reason (``bad_video``, ``prompt_too_long``, ``quarantined``, ...)."""
    load_skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped when the training file was loaded, by reason."""
    quarantined_ids: list[str] = field(default_factory=list)
    """Sample ids of the quarantined items (the operator's list of records to look at)."""

    def count_skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1

    def as_metrics(self) -> dict[str, float]:
        out = {f"data/{k}": float(v) for k, v in self.__dict__.items() if isinstance(v, (int, float))}
        out.update({f"data/skipped/{k}": float(v) for k, v in self.skip_reasons.items()})
        out.update({f"data/load_skipped/{k}": float(v) for k, v in self.load_skipped.items()})
        return out


class _Stop:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, exit cleanly (the CLI exits 128 + signal)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None

    def install(self) -> None:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handler)
        except ValueError:  # not the main thread (e.g. a test harness): no signal handling
            pass

    def _handler(self, signum, frame) -> None:
        log.warning("signal %s: checkpointing and stopping", signum)
        self.requested = True
        self.signum = signum


def _learner_options(cfg: Config) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
    if cfg.learner.device.startswith("cuda"):
        opts["num_gpus"] = 1
    if cfg.learner.placement_resource:
        opts["resources"] = {cfg.learner.placement_resource: 1}
    return opts


def train(
    cfg: Config,
    resume: bool = False,
    stop_after_updates: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_or_start: bool = False,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Run (or resume) training until ``learner.total_steps`` updates; returns a summary.

    ``should_stop`` (checked between steps) ends the run early with a checkpoint, like SIGTERM;
    it lets an embedding program (or a test) stop a run it started in a thread. ``resume`` needs a verified
    checkpoint (``resume_or_start`` starts fresh without one) whose run-defining config matches ``cfg``
    (``allow_config_change`` accepts a change). Raises ``ConfigError``/``ResumeError`` (user errors) before
    anything starts, and ``CheckpointError`` when the final or the stop checkpoint cannot be written.
    """
    out_dir = Path(cfg.output_dir)
    ckpt_root = Path(cfg.learner.checkpoint_dir)
    report = preflight(cfg)
    assert report is not None
    try:
        check_writable(out_dir, "output_dir")
        check_writable(ckpt_root)
    except CheckpointError as exc:  # found before the run: the operator's to fix (exit 2), not a failed save
        raise ConfigError(str(exc)) from exc
    log.info("training data %s: %s", cfg.data.train_path, report.summary())
    for err in report.errors[:20]:
        log.warning("training data: %s", err)
    if len(report.errors) > 20:
        log.warning("training data: %d more skipped records not shown", len(report.errors) - 20)
    cursor = DataCursor(report.records, cfg.seed)
    if cfg.learner.total_steps == 0:  # one epoch; resolved before anyone builds an LR schedule from it
        cfg = cfg.replace(**{"learner.total_steps": -(-len(report.records) // cfg.learner.questions_per_step)})
    resume_from, run_id = _resume_point(cfg, ckpt_root, resume, resume_or_start, allow_config_change)

    # The resolved config beside the results: what reports and resumes read back.
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    started_ray = init_ray(cfg)
    stop = _Stop()
    stop.install()
    learner = spawn_learner(cfg, str(resume_from or "") or None, _learner_options(cfg))  # one learner or a group
    metrics: MetricsLogger | None = None
    pool: ActorPool | None = None
    progress: _Progress | None = None
    try:
        state = ray.get(learner.resume_state.remote(), timeout=cfg.cluster.startup_timeout_s)
        weights: dict[int, WeightHandle] = ray.get(learner.publish_recent.remote(), timeout=cfg.cluster.call_timeout_s)
        version = int(state.get("version", 0))
        counters = Counters(**state.get("counters", {}))
        counters.load_skipped = dict(report.skipped)  # this load's: the file may have been fixed since
        metrics = MetricsLogger(
            cfg, out_dir, resume_step=version, resumed=resume_from is not None, wandb_step=state.get("wandb_step")
        )
        pool = ActorPool(cfg)
        pool.resize(force=True)
        placement = _PlacementWatch(cfg)
        placement.check(pool, force=True)
        deadline = time.monotonic() + cfg.cluster.startup_timeout_s
        while not any(s.ready for s in pool.slots.values()):  # pool.wait_ready(1), saying why it waits
            placement.check(pool)
            try:
                pool.wait_ready(1, timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise

        qps, lag = cfg.learner.questions_per_step, cfg.learner.max_staleness
        total = cfg.learner.total_steps
        end = total if stop_after_updates is None else min(total, version + stop_after_updates)
        progress = _Progress(version, end)
        queue: deque[dict[str, Any]] = deque()
        inflight: dict[Any, tuple[dict[str, Any], Any]] = {}  # status ref -> (item, payload ref)
        results: dict[int, dict[int, tuple[dict[str, Any], Any]]] = {}
        actor_stats: dict[str, dict[str, Any]] = {}
        cluster_monitor = ClusterMonitor()  # throughput, per-actor spread, device memory (learner/monitoring.py)
        strikes: Counter[int] = Counter()  # data index -> hangs, actor deaths and raised calls while it ran
        quarantine = set(counters.quarantined_ids)  # sample ids: a later epoch's copy is skipped without a try
        blamed: set[Any] = set()  # status refs of calls that were running when their actor died
        hinted: set[Any] = set()  # status refs of queued calls whose decode the actor was told to prefetch
        next_batch = version
        update_ref = None
        update_indices: list[int] = []  # data indices of the payloads the in-flight update was given, in order
        eval_ref = None
        saved_version = version if resume_from is not None else -1
        t_last = time.perf_counter()

        def ckpt(must: bool) -> None:
            nonlocal saved_version
            if saved_version == version:
                return
            if _checkpoint(learner, cfg, version, counters, ckpt_root, run_id, metrics, must):
                saved_version = version

        def strike(item: dict[str, Any], why: str) -> None:
            """Count a failure against ``item``; re-dispatch it, or quarantine it at ``max_item_failures``."""
            g = item["index"]
            strikes[g] += 1
            if strikes[g] < cfg.cluster.max_item_failures:
                queue.appendleft(item)
                counters.redispatched += 1
                return
            sample_id = str(item["record"].get("problem_id", g))
            log.error(
                "quarantined sample %s (data index %d) after %d failed calls (last: %s): skipped from now on",
                sample_id,
                g,
                strikes[g],
                why,
            )
            counters.quarantined += 1
            counters.quarantined_ids.append(sample_id)
            quarantine.add(sample_id)
            skip_quarantined(item, why)

        def skip_quarantined(item: dict[str, Any], why: str) -> None:
            """Record ``item`` as a skipped result of its batch (once; never for a batch already consumed)."""
            g = item["index"]
            if item["batch_index"] < version or g in results.get(item["batch_index"], {}):
                return
            counters.count_skip("quarantined")
            status = {
                "index": g,
                "batch_index": item["batch_index"],
                "sample_id": str(item["record"].get("problem_id", g)),
                "status": "skipped",
                "reason": "quarantined",
                "error": why,
            }
            results.setdefault(item["batch_index"], {})[g] = (status, None)

        def requeue(refs: list[Any]) -> None:
            for ref in refs:
                if ref in inflight:
                    item, _ = inflight.pop(ref)
                    hinted.discard(ref)
                    queue.appendleft(item)
                    counters.redispatched += 1

        while version < end:
            if not stop.requested and should_stop is not None and should_stop():
                stop.requested = True
            if stop.requested and update_ref is None:
                break  # an update in flight is finished first, so the stop checkpoint holds what it consumed
            # 1. Open the staleness window: batches up to version + L may be rolled out now.
            while next_batch < end and next_batch <= version + lag:
                queue.extend(cursor.item(g, next_batch) for g in range(next_batch * qps, (next_batch + 1) * qps))
                next_batch += 1
            # 2. Pool upkeep: follow the cluster's size; restart hung actors; strike the item each was running.
            requeue(pool.resize())
            placement.check(pool)
            for slot in pool.hung():
                log.warning("%s exceeded call_timeout_s: restarting it", slot.actor_id)
                counters.hung_restarts += 1
                refs = pool.restart(slot)  # in dispatch order: the first one is the call that was running
                if refs and refs[0] in inflight:
                    item, _ = inflight.pop(refs[0])
                    hinted.discard(refs[0])
                    strike(item, f"no answer within cluster.call_timeout_s={cfg.cluster.call_timeout_s:g}s")
                requeue(refs[1:])
            # 3. Keep every ready actor busy (bounded in-flight work per actor).
            for slot in pool.free_slots():
                while queue and len(slot.inflight) < cfg.cluster.inflight_per_actor:
                    item = queue.popleft()
                    if item["index"] in results.get(item["batch_index"], {}):
                        continue  # quarantined meanwhile
                    if str(item["record"].get("problem_id")) in quarantine:
                        skip_quarantined(item, "quarantined earlier in this run")
                        continue
                    handle = weights[max(0, item["batch_index"] - lag)]
                    status_ref, payload_ref, was_hinted = pool.submit(
                        slot, item, handle, prefetch=strikes[item["index"]] == 0
                    )
                    inflight[status_ref] = (item, payload_ref)
                    if was_hinted:
                        hinted.add(status_ref)
                    counters.dispatched += 1
                    log.debug(
                        "dispatch q%d (batch %d, v%d) -> %s",
                        item["index"],
                        item["batch_index"],
                        handle.version,
                        slot.actor_id,
                    )
            # 4. Update on the oldest batch once it is complete (strictly in order).
            if update_ref is None and not stop.requested and len(results.get(version, {})) == qps:
                update_indices = [g for g in sorted(results[version]) if results[version][g][0]["status"] == "ok"]
                oks = [results[version][g] for g in update_indices]
                update_ref = learner.update.remote([s for s, _ in oks], [p for _, p in oks])
                log.debug("update on batch %d (%d questions)", version, len(oks))
            # 5. Collect whatever finished.
            waitable = list(inflight) + [r for r in (update_ref, eval_ref) if r is not None]
            if not waitable:  # e.g. every actor is still starting
                time.sleep(0.05)
                continue
            ready, _ = ray.wait(waitable, num_returns=1, timeout=1.0)
            if ready:
                ready, _ = ray.wait(waitable, num_returns=len(waitable), timeout=0)
            # In dispatch order, which is each actor's run order: a call that finished is taken out of its actor's
            # queue before a later call's failure is looked at, so the head of the queue is the call that was running.
            for ref in sorted((r for r in ready if r in inflight), key=_dispatch_order(pool)):
                item, payload_ref = inflight.pop(ref)
                hinted.discard(ref)
                slot = pool.owner(ref)
                head = next(iter(slot.inflight), None) if slot is not None else None
                if slot is not None:
                    slot.inflight.pop(ref, None)
                try:
                    status = ray.get(ref, timeout=60)
                except (RayActorError, RayTaskError, GetTimeoutError) as exc:
                    why = " ".join(str(exc).split())[:300]
                    log.warning("reward call for sample %s failed (%s): re-dispatching", item["index"], why)
                    counters.actor_failures += 1
                    if isinstance(exc, RayActorError) and slot is not None and slot.ready and head is not None:
                        # The first failure seen since the actor was up: blame the call it was running, and the queued
                        # calls whose videos it was decoding ahead (prefetch): a crash in decord there is theirs as
                        # much. Queued calls that were not hinted fail too but are not at fault.
                        blamed.add(head)
                        blamed.update(r for r in slot.inflight if r in hinted)
                    if isinstance(exc, RayTaskError) or ref in blamed:
                        blamed.discard(ref)
                        strike(item, f"{type(exc).__name__}: {why}")
                    else:
                        queue.appendleft(item)
                        counters.redispatched += 1
                    if slot is not None and isinstance(exc, RayActorError):
                        pool.mark_failed(slot)
                    continue
                batch = results.setdefault(item["batch_index"], {})
                if item["index"] in batch or item["batch_index"] < version:
                    counters.duplicates += 1  # a re-dispatched question whose first try also finished
                    continue
                batch[item["index"]] = (status, payload_ref)
                log.debug("done q%d by %s (%s)", item["index"], status["actor_id"], status["status"])
                actor_stats[status["actor_id"]] = status
                if status["status"] != "ok":
                    counters.count_skip(str(status.get("reason", "skipped")))
                    log.warning("skipped sample %s: %s", status["sample_id"], status.get("error", ""))
            # 6. A finished update: new version, metrics, checkpoint, maybe an evaluation.
            if update_ref is not None and update_ref in ready:
                res = ray.get(update_ref, timeout=cfg.cluster.call_timeout_s)
                update_ref = None
                if "lost" in res:
                    # Trajectories stored on a node that left after its rollout: roll those questions out again.
                    for pos in res["lost"]:
                        g = update_indices[pos]
                        del results[version][g]
                        queue.appendleft(cursor.item(g, version))
                        counters.lost_payloads += 1
                        counters.redispatched += 1
                    log.warning("batch %d: %d trajectories lost with a node, re-dispatched", version, len(res["lost"]))
                    continue
                batch = results.pop(version)
                counters.consumed += len(batch)
                counters.consumed_indices.extend(sorted(batch))
                version = res["version"]
                weights[version] = res["handle"]
                for v in [v for v in weights if v < version - lag]:
                    del weights[v]  # drop the reference: the object store frees that version
                now = time.perf_counter()
                ready_actors = sum(s.ready for s in pool.slots.values())
                step_metrics = {
                    **res["metrics"],
                    **counters.as_metrics(),
                    **cluster_monitor.metrics(actor_stats, live=pool.slots),
                    "sync/version": float(version),
                    "pool/size": float(len(pool.slots)),
                    "pool/ready": float(ready_actors),
                    "pool/pending": float(len(pool.slots) - ready_actors),
                    "pool/created": float(pool.created),
                    "timing/step": now - t_last,
                }
                t_last = now
                metrics.log(step_metrics, step=version)
                progress.update(version, step_metrics)
                if version % cfg.learner.checkpoint_every == 0 or version == end:
                    ckpt(must=version == end)
                if eval_ref is None and cfg.eval.every_steps and version % cfg.eval.every_steps == 0:
                    eval_ref = _launch_eval(cfg, weights[version], version)
            if eval_ref is not None and eval_ref in ready:
                _log_eval(metrics, eval_ref, out_dir, counters)
                eval_ref = None
        if stop.requested:
            ckpt(must=True)
        ray.get(learner.save_policy.remote(str(out_dir / "policy")), timeout=cfg.cluster.call_timeout_s)
        if eval_ref is not None:
            _log_eval(metrics, eval_ref, out_dir, counters)
        checkpoint = latest_checkpoint(ckpt_root)
        summary = {
            "version": version,
            "counters": counters.__dict__,
            "skipped": dict(counters.skip_reasons),
            "load_skipped": dict(counters.load_skipped),
            "quarantined": list(counters.quarantined_ids),
            "policy_dir": str(out_dir / "policy"),
            "checkpoint": str(checkpoint or ""),
            "weights_checksum": ray.get(learner.weights_checksum.remote()),
            "stopped_early": stop.requested,
            "stopped_by_signal": stop.signum,
            "pool": {"size": len(pool.slots), "ready": sum(s.ready for s in pool.slots.values())},
        }
        if stop.signum is not None:
            log.warning(
                "stopped by signal %d at update %d; checkpoint %s (continue with --resume)",
                stop.signum,
                version,
                checkpoint,
            )
        return summary
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        if pool is not None:
            pool.shutdown()
        ray.kill(learner)
        if started_ray:
            ray.shutdown()


def _dispatch_order(pool: ActorPool) -> Callable[[Any], float]:
    """Sort key of status refs: when each was dispatched (refs of removed actors first)."""
    times = {ref: t for slot in pool.slots.values() for ref, t in slot.inflight.items()}
    return lambda ref: times.get(ref, 0.0)


def _resume_point(
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


class _PlacementWatch:
    """Says, with the missing resources, when reward actors wait for placement (they used to wait silently).

    Logged after ``grace_s`` of waiting and again only when the number waiting changes (or every ``repeat_s``).
    """

    def __init__(self, cfg: Config, grace_s: float = 20.0, repeat_s: float = 300.0) -> None:
        c = cfg.cluster
        self.cfg = cfg
        self.need = {
            "CPU": c.actor_num_cpus,
            "GPU": c.actor_num_gpus,
            **({c.actor_resource: 1.0} if c.actor_resource else {}),
        }
        self.need = {k: v for k, v in self.need.items() if v > 0}
        self.grace_s, self.repeat_s = grace_s, repeat_s
        self.waiting_since: dict[str, float] = {}
        self.last: tuple[int, float] = (0, 0.0)

    def check(self, pool: ActorPool, force: bool = False) -> None:
        now = time.monotonic()
        if force:
            self._static_check(pool)
            return
        waiting = [s.actor_id for s in pool.slots.values() if not s.ready]
        self.waiting_since = {a: self.waiting_since.get(a, now) for a in waiting}
        late = [a for a, t in self.waiting_since.items() if now - t >= self.grace_s]
        if not late:
            self.last = (0, self.last[1])
            return
        if len(late) == self.last[0] and now - self.last[1] < self.repeat_s:
            return
        self.last = (len(late), now)
        try:
            total, free = ray.cluster_resources(), ray.available_resources()
        except Exception:  # a cluster query failing must not stop training
            total, free = {}, {}
        short = {k: v for k, v in self.need.items() if free.get(k, 0.0) < v}
        log.warning(
            "%d of %d reward actors not placed after %.0fs (%s): each needs %s; the cluster has %s in total, %s free%s",
            len(late),
            len(pool.slots),
            self.grace_s,
            ", ".join(late),
            _fmt(self.need),
            _fmt({k: total.get(k, 0.0) for k in self.need}),
            _fmt({k: free.get(k, 0.0) for k in self.need}),
            f"; missing {_fmt(short)}" if short else " (they may still be starting)",
        )

    def _static_check(self, pool: ActorPool) -> None:
        """A local instance's size is known: say up front when not every actor can ever be placed."""
        c = self.cfg.cluster
        if c.address != "local" or c.actor_num_cpus <= 0:
            return
        fits = int(c.num_cpus // c.actor_num_cpus)
        if fits < len(pool.slots):
            log.warning(
                "only %d of %d reward actors fit on the local Ray instance (cluster.num_cpus=%d, "
                "cluster.actor_num_cpus=%g): the pool runs with %d; raise cluster.num_cpus or lower cluster.max_actors",
                fits,
                len(pool.slots),
                c.num_cpus,
                c.actor_num_cpus,
                fits,
            )


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


class _Progress:
    """A tqdm bar of policy updates on a terminal (reward, loss, s/update), and a log line every tenth of the
    run for logs that are not a terminal (``ray job logs``, CI), where a bar would be noise."""

    def __init__(self, start: int, end: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=end, initial=start, desc="policy updates", unit="update", disable=None)
        self.every = max(1, (end - start) // 10)
        self.start, self.end = start, end

    def update(self, version: int, m: dict[str, Any]) -> None:
        shown = {
            "reward": m.get("reward/mean", float("nan")),
            "loss": m.get("loss/total", float("nan")),
            "s/update": m.get("timing/step", float("nan")),
        }
        self.bar.update(version - self.bar.n)
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        if self.bar.disable and ((version - self.start) % self.every == 0 or version == self.end):
            log.info("update %d/%d: %s", version, self.end, ", ".join(f"{k} {v:.3g}" for k, v in shown.items()))

    def close(self) -> None:
        self.bar.close()


def _checkpoint(
    learner,
    cfg: Config,
    version: int,
    counters: Counters,
    root: Path,
    run_id: str,
    metrics: MetricsLogger,
    must: bool,
) -> bool:
    """Save checkpoint ``version``; True when it was written.

    A periodic save that fails (a full disk, a network filesystem hiccup) is logged and counted, and the next
    one tries again: the run keeps its updates. The final and the stop checkpoint (``must``) raise
    ``CheckpointError`` naming the last good checkpoint, so the exit code says the run's state was not saved.
    """
    state = {
        "version": version,
        "counters": counters.__dict__,
        "run_id": run_id,
        "config": cfg.to_dict(),
        "wandb_step": metrics.wandb_step,
    }
    try:
        path = ray.get(learner.save.remote(str(root), state), timeout=cfg.cluster.call_timeout_s)
    except Exception as exc:
        counters.checkpoint_failures += 1
        why = " ".join(str(exc).split())[-400:]
        last = latest_checkpoint(root)
        if must:
            raise CheckpointError(
                f"checkpoint of update {version} under {root} failed ({why}); the last good checkpoint is "
                f"{last or 'none'}"
            ) from exc
        log.warning("checkpoint of update %d failed, retrying at the next one (last good: %s): %s", version, last, why)
        return False
    log.info("checkpoint %s", path)
    return True


def _launch_eval(cfg: Config, handle: WeightHandle, version: int):
    from actors.evaluation import launch_evaluation

    return launch_evaluation(cfg, handle, version)


def _log_eval(metrics: MetricsLogger, ref: Any, out_dir: Path, counters: Counters) -> None:
    """Write and log a finished evaluation; a failed one is logged and counted, never fatal to training."""
    from cacovid_rl.eval.evaluate import write_eval_outputs

    try:
        result = ray.get(ref)
        log_samples(metrics, result, out_dir / "eval")  # the sample-question table; pops result["samples"]
        _json_path, png_path, flat, rows = write_eval_outputs(result, out_dir / "eval")
    except Exception as exc:
        counters.eval_failures += 1
        log.warning("periodic evaluation failed, training goes on: %s", " ".join(str(exc).split())[-400:])
        return
    metrics.log(flat, step=int(result["version"]))
    metrics.log_table("eval/accuracy", ["method", "retention", "accuracy"], rows, int(result["version"]), png_path)
