"""The training driver: dispatch -> collect rollouts -> update -> sync weights -> evaluate -> log.

:func:`train` is the loop; each stage is a method of :class:`_Run` and its wall time goes into the metrics as
``timing/<stage>`` (seconds since the previous update, summed over the loop's turns). Which question runs with which
weight version, and everything about duplicates, re-dispatch and poison records, is the Ray-free
:class:`learner.staleness.StalenessSchedule`; this module does the Ray calls and tells the schedule what happened.

Failure containment (what a 40-hour run must survive without an operator):
- Everything that can be checked before Ray starts is (``cacovid_rl.preflight``, the checkpoint directory's
  writability, the resumed checkpoint's checksums and config), so an operator mistake costs seconds, not hours.
- A dead, hung or removed reward actor loses no question (the schedule re-dispatches them); a call that hangs past
  ``cluster.call_timeout_s``, kills its actor or raises in it is a strike against its item.
- A periodic checkpoint that fails is retried at the next one; the final and the stop checkpoint must succeed
  (``CheckpointError`` otherwise). A local Ray instance runs in its own session (``learner/ray_runtime.py``), so a
  signal sent to the driver's process group reaches the driver, which checkpoints, and not the raylet it needs.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.weights import WeightHandle
from cacovid_rl.config import Config, ConfigError
from cacovid_rl.data.records import LoadReport
from cacovid_rl.preflight import preflight
from cacovid_rl.rl.worker import RolloutStatus, WorkItem
from learner.checkpoint import CheckpointError, check_writable, latest_checkpoint
from learner.learner_actor import UpdateResult
from learner.learner_group import spawn_learner
from learner.metrics import MetricsLogger, StageTimer
from learner.monitoring import ClusterMonitor, log_samples
from learner.placement import PlacementWatch
from learner.pool import ActorPool, Slot
from learner.ray_runtime import init_ray
from learner.resume import resume_point
from learner.staleness import Counters, DataCursor, StalenessSchedule

log = logging.getLogger("cacovid_rl.driver")


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
    cfg, data, cursor = _check_before_start(cfg)
    resume_from, run_id = resume_point(
        cfg, Path(cfg.learner.checkpoint_dir), resume, resume_or_start, allow_config_change
    )
    # The resolved config beside the results: what reports and resumes read back.
    (Path(cfg.output_dir) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    started_ray = init_ray(cfg.cluster)
    stop = _Stop(should_stop)
    learner = spawn_learner(cfg, str(resume_from or "") or None, _learner_options(cfg))  # one learner or a group
    run = _Run(cfg, learner, stop)
    try:
        run.setup(cursor, data.skipped, resume_from, run_id, stop_after_updates)
        timed = run.timer
        while run.going():
            with timed("dispatch"):
                run.dispatch()
            with timed("collect"):
                run.collect_rollouts()
            with timed("update"):
                result = run.update()
            if result is not None:
                with timed("sync_weights"):
                    run.sync_weights(result)
            with timed("evaluate"):
                run.evaluate(launch=result is not None)
            if result is not None:
                with timed("log"):
                    run.log(result)
        return run.finish()
    finally:
        run.close()
        ray.kill(learner)
        if started_ray:
            ray.shutdown()


def _check_before_start(cfg: Config) -> tuple[Config, LoadReport, DataCursor]:
    """Preflight, writable output and checkpoint directories, the training data (its skips logged) and its cursor;
    the config with ``learner.total_steps == 0`` resolved to one epoch (before anyone builds an LR schedule)."""
    report = preflight(cfg)
    assert report is not None
    try:
        check_writable(Path(cfg.output_dir), "output_dir")
        check_writable(Path(cfg.learner.checkpoint_dir))
    except CheckpointError as exc:  # found before the run: the operator's to fix (exit 2), not a failed save
        raise ConfigError(str(exc)) from exc
    log.info("training data %s: %s", cfg.data.train_path, report.summary())
    for err in report.errors[:20]:
        log.warning("training data: %s", err)
    if len(report.errors) > 20:
        log.warning("training data: %d more skipped records not shown", len(report.errors) - 20)
    cursor = DataCursor(report.records, cfg.seed)
    if cfg.learner.total_steps == 0:
        cfg = cfg.replace(**{"learner.total_steps": -(-len(report.records) // cfg.learner.questions_per_step)})
    return cfg, report, cursor


class _Stop:
    """SIGTERM/SIGINT (or ``should_stop``) -> finish the current step, checkpoint, exit cleanly (the CLI exits
    128 + signal)."""

    def __init__(self, should_stop: Callable[[], bool] | None) -> None:
        self.requested = False
        self.signum: int | None = None
        self.should_stop = should_stop
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handler)
        except ValueError:  # not the main thread (e.g. a test harness): no signal handling
            pass

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("signal %s: checkpointing and stopping", signum)
        self.requested = True
        self.signum = signum

    def poll(self) -> bool:
        if not self.requested and self.should_stop is not None and self.should_stop():
            self.requested = True
        return self.requested


def _learner_options(cfg: Config) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0}
    if cfg.learner.device.startswith("cuda"):
        opts["num_gpus"] = 1
    if cfg.learner.placement_resource:
        opts["resources"] = {cfg.learner.placement_resource: 1}
    return opts


class _Run:
    """One run's state between setup and summary; the loop's stages are its methods."""

    def __init__(self, cfg: Config, learner: Any, stop: _Stop) -> None:
        self.cfg = cfg
        self.learner = learner
        self.stop = stop
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_root = Path(cfg.learner.checkpoint_dir)
        self.timer = StageTimer()
        self.metrics: MetricsLogger | None = None
        self.pool: ActorPool | None = None
        self.progress: _Progress | None = None
        self.ready: set[Any] = set()  # what the last wait found finished
        self.update_ref: Any = None
        self.eval_ref: Any = None
        self.actor_stats: dict[str, RolloutStatus] = {}  # actor id -> its latest status (monitoring)
        self.monitor = ClusterMonitor()

    # -- setup --------------------------------------------------------------------------------------------------------
    def setup(
        self,
        cursor: DataCursor,
        load_skipped: dict[str, int],
        resume_from: Path | None,
        run_id: str,
        stop_after: int | None,
    ) -> None:
        """The learner's resume state and weights, the metrics logger, the actor pool (one actor up), the schedule."""
        cfg, c = self.cfg, self.cfg.cluster
        state = ray.get(self.learner.resume_state.remote(), timeout=c.startup_timeout_s)
        self.weights: dict[int, WeightHandle] = ray.get(self.learner.publish_recent.remote(), timeout=c.call_timeout_s)
        version = int(state.get("version", 0))
        self.counters = Counters(**state.get("counters", {}))
        self.counters.load_skipped = dict(load_skipped)  # this load's: the file may have been fixed since
        self.run_id = run_id
        self.saved_version = version if resume_from is not None else -1
        self.metrics = MetricsLogger(
            cfg, self.out_dir, resume_step=version, resumed=resume_from is not None, wandb_step=state.get("wandb_step")
        )
        self.pool = ActorPool(cfg)
        self.pool.resize(force=True)
        self.placement = PlacementWatch(cfg)
        self.placement.check(self.pool, force=True)
        self.placement.wait_first_actor(self.pool, c.startup_timeout_s)
        total = cfg.learner.total_steps
        self.end = total if stop_after is None else min(total, version + stop_after)
        self.progress = _Progress(version, self.end)
        self.schedule = StalenessSchedule(
            cursor,
            questions_per_step=cfg.learner.questions_per_step,
            max_staleness=cfg.learner.max_staleness,
            max_item_failures=c.max_item_failures,
            version=version,
            end=self.end,
            counters=self.counters,
        )
        self.t_last = time.perf_counter()

    @property
    def version(self) -> int:
        return self.schedule.version

    def going(self) -> bool:
        """Until the last update; a stop waits for the update in flight, so the stop checkpoint holds what it used."""
        if self.stop.poll() and self.update_ref is None:
            return False
        return self.version < self.end

    # -- dispatch -----------------------------------------------------------------------------------------------------
    def dispatch(self) -> None:
        """Open the staleness window, follow the cluster (resize, hung actors), give every free actor work, and the
        learner the oldest batch once it is complete (strictly in order)."""
        assert self.pool is not None
        self.schedule.open_window()
        self.schedule.requeue(self.pool.resize())
        self.placement.check(self.pool)
        for slot in self.pool.hung():
            log.warning("%s exceeded call_timeout_s: restarting it", slot.actor_id)
            self.counters.hung_restarts += 1
            # In dispatch order: the first call was running (a strike against its item), the rest were queued.
            why = f"no answer within cluster.call_timeout_s={self.cfg.cluster.call_timeout_s:g}s"
            self.schedule.timed_out(self.pool.restart(slot), why)
        for slot in self.pool.free_slots():
            self._fill(slot)
        if self.update_ref is None and not self.stop.requested:
            batch = self.schedule.complete_batch()
            if batch is not None:
                self.update_ref = self.learner.update.remote(*batch)
                log.debug("update on batch %d (%d questions)", self.version, len(batch[0]))

    def _fill(self, slot: Slot) -> None:
        """Queue items on ``slot`` up to ``cluster.inflight_per_actor``, each with its batch's weight version."""
        assert self.pool is not None
        while len(slot.inflight) < self.cfg.cluster.inflight_per_actor:
            item = self.schedule.next_item()
            if item is None:
                return
            handle = self.weights[self.schedule.weight_version(item)]
            prefetch = self.schedule.may_prefetch(item)
            status_ref, payload_ref, hinted = self.pool.submit(slot, item, handle, prefetch=prefetch)
            self.schedule.dispatched(status_ref, item, payload_ref, hinted)
            log.debug("dispatch q%d (batch %d, v%d) -> %s", item.index, item.batch_index, handle.version, slot.actor_id)

    # -- collect rollouts ---------------------------------------------------------------------------------------------
    def collect_rollouts(self) -> None:
        """Wait (at most 1 s) until a rollout, the update or the evaluation finishes; record finished rollouts."""
        assert self.pool is not None
        waitable = self.schedule.pending() + [r for r in (self.update_ref, self.eval_ref) if r is not None]
        if not waitable:  # e.g. every actor is still starting
            self.ready = set()
            time.sleep(0.05)
            return
        ready, _ = ray.wait(waitable, num_returns=1, timeout=1.0)
        if ready:
            ready, _ = ray.wait(waitable, num_returns=len(waitable), timeout=0)
        self.ready = set(ready)
        # In dispatch order, which is each actor's run order: a call that finished is taken out of its actor's
        # queue before a later call's failure is looked at, so the head of the queue is the call that was running.
        times = {ref: t for slot in self.pool.slots.values() for ref, t in slot.inflight.items()}
        for ref in sorted((r for r in ready if self.schedule.is_pending(r)), key=lambda r: times.get(r, 0.0)):
            self._collect(ref)

    def _collect(self, ref: Any) -> None:
        assert self.pool is not None
        item, payload_ref = self.schedule.finished(ref)
        slot = self.pool.owner(ref)
        head = next(iter(slot.inflight), None) if slot is not None else None
        if slot is not None:
            slot.inflight.pop(ref, None)
        try:
            status: RolloutStatus = ray.get(ref, timeout=60)
        except (RayActorError, RayTaskError, GetTimeoutError) as exc:
            self._call_failed(ref, item, slot, head, exc)
            return
        if not self.schedule.record(item, status, payload_ref):
            return  # a re-dispatched question whose first try also finished (counted)
        log.debug("done q%d by %s (%s)", item.index, status.actor_id, status.status)
        self.actor_stats[status.actor_id] = status
        if not status.ok:
            log.warning("skipped sample %s: %s", status.sample_id, status.error)

    def _call_failed(self, ref: Any, item: WorkItem, slot: Slot | None, head: Any, exc: Exception) -> None:
        assert self.pool is not None
        why = " ".join(str(exc).split())[:300]
        log.warning("reward call for sample %s failed (%s): re-dispatching", item.index, why)
        self.counters.actor_failures += 1
        died = isinstance(exc, RayActorError)
        if died and slot is not None and slot.up and head is not None:
            # The first failure seen since the actor was up: it was running ``head``.
            self.schedule.blame(head, slot.inflight)
        self.schedule.failed(ref, item, f"{type(exc).__name__}: {why}", raised=isinstance(exc, RayTaskError))
        if died and slot is not None:
            self.pool.mark_failed(slot)

    # -- update, sync weights ---------------------------------------------------------------------------------------
    def update(self) -> UpdateResult | None:
        """The finished update, if it finished and was applied (a batch with lost trajectories is rolled out again)."""
        if self.update_ref is None or self.update_ref not in self.ready:
            return None
        result: UpdateResult = ray.get(self.update_ref, timeout=self.cfg.cluster.call_timeout_s)
        self.update_ref = None
        if not result.applied:
            # Trajectories stored on a node that left after its rollout: roll those questions out again.
            n = self.schedule.lost(result.lost)
            log.warning("batch %d: %d trajectories lost with a node, re-dispatched", self.version, n)
            return None
        self.schedule.consumed(result.version)
        return result

    def sync_weights(self, result: UpdateResult) -> None:
        """Make the new version the one later batches are dispatched with; keep only the versions in-flight work may
        still need, so older buffers leave the object store (actors pull a version with their next item)."""
        assert result.handle is not None
        self.weights[result.version] = result.handle
        for v in [v for v in self.weights if v < result.version - self.cfg.learner.max_staleness]:
            del self.weights[v]  # drop the reference: the object store frees that version

    # -- evaluate -----------------------------------------------------------------------------------------------------
    def evaluate(self, launch: bool) -> None:
        """Start a periodic evaluation of the new version (``launch``: an update was just applied) when one is due
        and none runs; write and log one that finished."""
        every = self.cfg.eval.every_steps
        if launch and self.eval_ref is None and every and self.version % every == 0:
            from actors.evaluation import launch_evaluation

            self.eval_ref = launch_evaluation(self.cfg, self.weights[self.version], self.version)
        elif self.eval_ref is not None and self.eval_ref in self.ready:
            self._log_eval()

    def _log_eval(self) -> None:
        """Write and log the finished evaluation; a failed one is logged and counted, never fatal to training."""
        from cacovid_rl.eval.evaluate import write_eval_outputs

        assert self.metrics is not None
        ref, self.eval_ref = self.eval_ref, None
        try:
            result = ray.get(ref)
            log_samples(self.metrics, result, self.out_dir / "eval")  # the sample-question table; pops "samples"
            _json_path, png_path, flat, rows = write_eval_outputs(result, self.out_dir / "eval")
        except Exception as exc:
            self.counters.eval_failures += 1
            log.warning("periodic evaluation failed, training goes on: %s", " ".join(str(exc).split())[-400:])
            return
        step = int(result["version"])
        self.metrics.log(flat, step=step)
        self.metrics.log_table("eval/accuracy", ["method", "retention", "accuracy"], rows, step, png_path)

    # -- log ----------------------------------------------------------------------------------------------------------
    def log(self, result: UpdateResult) -> None:
        """The update's metrics with the run's counters, the pool, the actors' readings and the stage timings (the
        ``log`` stage of the previous update, its checkpoint included, counts in this one); then a checkpoint when
        one is due."""
        assert self.metrics is not None and self.pool is not None and self.progress is not None
        now = time.perf_counter()
        ready = self.pool.ready_count()
        step_metrics = {
            **result.metrics,
            **self.counters.as_metrics(),
            **self.monitor.metrics(self.actor_stats, live=self.pool.slots),
            **self.timer.take(),
            "sync/version": float(self.version),
            "pool/size": float(len(self.pool.slots)),
            "pool/ready": float(ready),
            "pool/pending": float(len(self.pool.slots) - ready),
            "pool/created": float(self.pool.created),
            "timing/step": now - self.t_last,
        }
        self.t_last = now
        self.metrics.log(step_metrics, step=self.version)
        self.progress.update(self.version, step_metrics)
        if self.version % self.cfg.learner.checkpoint_every == 0 or self.version == self.end:
            self.checkpoint(must=self.version == self.end)

    def checkpoint(self, must: bool) -> None:
        """Checkpoint the current version unless it already is (``must``: see :func:`_checkpoint`)."""
        assert self.metrics is not None
        if self.saved_version == self.version:
            return
        if _checkpoint(self.learner, self.cfg, self.version, self.counters, self.ckpt_root, self.run_id,
                       self.metrics, must):  # fmt: skip
            self.saved_version = self.version

    # -- end ----------------------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """The stop checkpoint, the final policy, the last evaluation; the run's summary."""
        assert self.pool is not None
        stop, timeout = self.stop, self.cfg.cluster.call_timeout_s
        if stop.requested:
            self.checkpoint(must=True)
        ray.get(self.learner.save_policy.remote(str(self.out_dir / "policy")), timeout=timeout)
        if self.eval_ref is not None:
            self._log_eval()
        checkpoint = latest_checkpoint(self.ckpt_root)
        if stop.signum is not None:
            log.warning(
                "stopped by signal %d at update %d; checkpoint %s (continue with --resume)",
                stop.signum,
                self.version,
                checkpoint,
            )
        return {
            "version": self.version,
            "counters": self.counters.__dict__,
            "skipped": dict(self.counters.skip_reasons),
            "load_skipped": dict(self.counters.load_skipped),
            "quarantined": list(self.counters.quarantined_ids),
            "policy_dir": str(self.out_dir / "policy"),
            "checkpoint": str(checkpoint or ""),
            "weights_checksum": ray.get(self.learner.weights_checksum.remote()),
            "stopped_early": stop.requested,
            "stopped_by_signal": stop.signum,
            "pool": {"size": len(self.pool.slots), "ready": self.pool.ready_count()},
        }

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.pool is not None:
            self.pool.shutdown()


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
    learner: Any,
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
