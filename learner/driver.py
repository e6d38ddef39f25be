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
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import yaml
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cacovid_rl.config import Config
from cacovid_rl.data.records import load_records
from cacovid_rl.rl.worker import WorkItem
from learner.checkpoint import latest_checkpoint
from learner.learner_actor import Learner
from learner.metrics import MetricsLogger
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
    consumed_indices: list[int] = field(default_factory=list)

    def as_metrics(self) -> dict[str, float]:
        return {f"data/{k}": float(v) for k, v in self.__dict__.items() if not isinstance(v, list)}


class _Stop:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handler)
        except ValueError:  # not the main thread (e.g. a test harness): no signal handling
            pass

    def _handler(self, signum, frame) -> None:
        log.warning("signal %s: checkpointing and stopping", signum)
        self.requested = True


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
) -> dict[str, Any]:
    """Run (or resume) training until ``learner.total_steps`` updates; returns a summary.

    ``should_stop`` (checked between steps) ends the run early with a checkpoint, like SIGTERM;
    it lets an embedding program (or a test) stop a run it started in a thread.
    """
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = Path(cfg.learner.checkpoint_dir)
    report = load_records(cfg.data.train_path, cfg.data.video_root)
    for err in report.errors[:20]:
        log.warning("training data: %s", err)
    cursor = DataCursor(report.records, cfg.seed)
    if cfg.learner.total_steps == 0:  # one epoch; resolved before anyone builds an LR schedule from it
        cfg = cfg.replace(**{"learner.total_steps": -(-len(report.records) // cfg.learner.questions_per_step)})
    resume_from = latest_checkpoint(ckpt_root) if resume else None
    if resume and resume_from is None:
        log.warning("--resume: no checkpoint under %s, starting fresh", ckpt_root)

    # The resolved config beside the results: what reports and resumes read back.
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    started_ray = init_ray(cfg)
    stop = _Stop()
    stop.install()
    learner = ray.remote(Learner).options(**_learner_options(cfg)).remote(cfg.to_dict(), str(resume_from or "") or None)
    state = ray.get(learner.resume_state.remote(), timeout=cfg.cluster.startup_timeout_s)
    weights: dict[int, WeightHandle] = ray.get(learner.publish_recent.remote(), timeout=cfg.cluster.call_timeout_s)
    version = int(state.get("version", 0))
    counters = Counters(**state.get("counters", {}))
    metrics = MetricsLogger(cfg, out_dir, resume_step=version)
    pool = ActorPool(cfg)
    pool.resize(force=True)
    pool.wait_ready(1, timeout=cfg.cluster.startup_timeout_s)

    qps, lag = cfg.learner.questions_per_step, cfg.learner.max_staleness
    total = cfg.learner.total_steps
    end = total if stop_after_updates is None else min(total, version + stop_after_updates)
    progress = _Progress(version, end)
    queue: deque[dict[str, Any]] = deque()
    inflight: dict[Any, tuple[dict[str, Any], Any]] = {}  # status ref -> (item, payload ref)
    results: dict[int, dict[int, tuple[dict[str, Any], Any]]] = {}
    actor_stats: dict[str, dict[str, Any]] = {}
    next_batch = version
    update_ref = None
    update_indices: list[int] = []  # data indices of the payloads the in-flight update was given, in order
    eval_ref = None
    t_last = time.perf_counter()

    def requeue(refs: list[Any]) -> None:
        for ref in refs:
            if ref in inflight:
                item, _ = inflight.pop(ref)
                queue.appendleft(item)
                counters.redispatched += 1

    try:
        while version < end and not stop.requested:
            if should_stop is not None and should_stop():
                stop.requested = True
                break
            # 1. Open the staleness window: batches up to version + L may be rolled out now.
            while next_batch < end and next_batch <= version + lag:
                queue.extend(cursor.item(g, next_batch) for g in range(next_batch * qps, (next_batch + 1) * qps))
                next_batch += 1
            # 2. Pool upkeep: follow the cluster's size; restart hung actors and re-dispatch their work.
            requeue(pool.resize())
            for slot in pool.hung():
                log.warning("%s exceeded call_timeout_s: restarting it", slot.actor_id)
                counters.hung_restarts += 1
                requeue(pool.restart(slot))
            # 3. Keep every ready actor busy (bounded in-flight work per actor).
            for slot in pool.free_slots():
                while queue and len(slot.inflight) < cfg.cluster.inflight_per_actor:
                    item = queue.popleft()
                    handle = weights[max(0, item["batch_index"] - lag)]
                    status_ref, payload_ref = pool.submit(slot, item, handle)
                    inflight[status_ref] = (item, payload_ref)
                    counters.dispatched += 1
                    log.debug(
                        "dispatch q%d (batch %d, v%d) -> %s",
                        item["index"],
                        item["batch_index"],
                        handle.version,
                        slot.actor_id,
                    )
            # 4. Update on the oldest batch once it is complete (strictly in order).
            if update_ref is None and len(results.get(version, {})) == qps:
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
            for ref in ready:
                if ref is update_ref or ref is eval_ref:
                    continue
                item, payload_ref = inflight.pop(ref)
                slot = pool.owner(ref)
                if slot is not None:
                    slot.inflight.pop(ref, None)
                try:
                    status = ray.get(ref, timeout=60)
                except (RayActorError, RayTaskError, GetTimeoutError) as exc:
                    log.warning("reward call for sample %s failed (%s): re-dispatching", item["index"], exc)
                    counters.actor_failures += 1
                    counters.redispatched += 1
                    queue.appendleft(item)
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
                    counters.skipped += 1
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
                step_metrics = {
                    **res["metrics"],
                    **counters.as_metrics(),
                    **_actor_metrics(actor_stats),
                    "sync/version": float(version),
                    "pool/size": float(len(pool.slots)),
                    "pool/ready": float(sum(s.ready for s in pool.slots.values())),
                    "pool/created": float(pool.created),
                    "timing/step": now - t_last,
                }
                t_last = now
                metrics.log(step_metrics, step=version)
                progress.update(version, step_metrics)
                if version % cfg.learner.checkpoint_every == 0 or version == end:
                    _checkpoint(learner, cfg, version, counters, ckpt_root)
                if eval_ref is None and cfg.eval.every_steps and version % cfg.eval.every_steps == 0:
                    eval_ref = _launch_eval(cfg, weights[version], version)
            if eval_ref is not None and eval_ref in ready:
                _log_eval(metrics, ray.get(eval_ref), out_dir)
                eval_ref = None
        if stop.requested:
            _checkpoint(learner, cfg, version, counters, ckpt_root)
        ray.get(learner.save_policy.remote(str(out_dir / "policy")), timeout=cfg.cluster.call_timeout_s)
        if eval_ref is not None:
            _log_eval(metrics, ray.get(eval_ref), out_dir)
        summary = {
            "version": version,
            "counters": counters.__dict__,
            "policy_dir": str(out_dir / "policy"),
            "checkpoint": str(latest_checkpoint(ckpt_root) or ""),
            "weights_checksum": ray.get(learner.weights_checksum.remote()),
            "stopped_early": stop.requested,
        }
        return summary
    finally:
        progress.close()
        metrics.close()
        pool.shutdown()
        ray.kill(learner)
        if started_ray:
            ray.shutdown()


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


def _checkpoint(learner, cfg: Config, version: int, counters: Counters, root: Path) -> None:
    state = {"version": version, "counters": counters.__dict__}
    ray.get(learner.save.remote(str(root), state), timeout=cfg.cluster.call_timeout_s)


def _actor_metrics(stats: dict[str, dict[str, Any]]) -> dict[str, float]:
    if not stats:
        return {}
    ok = [s for s in stats.values() if s["status"] == "ok"]
    out = {
        "perf/actor_utilisation": float(np.mean([s["busy_s"] / max(1e-9, s["alive_s"]) for s in stats.values()])),
        "sync/latency_s": float(np.mean([s["sync_latency_s"] for s in stats.values()])),
        "sync/load_s": float(np.mean([s["sync_load_s"] for s in stats.values()])),
    }
    if ok:
        out["perf/combos_per_s_per_actor"] = float(np.mean([s["combos"] / max(1e-9, s["elapsed_s"]) for s in ok]))
        out["timing/score"] = float(np.mean([s["timings"]["score"] for s in ok]))
        out["timing/encode"] = float(np.mean([s["timings"]["encode"] for s in ok]))
    return out


def _launch_eval(cfg: Config, handle: WeightHandle, version: int):
    from actors.evaluation import launch_evaluation

    return launch_evaluation(cfg, handle, version)


def _log_eval(metrics: MetricsLogger, result: dict[str, Any], out_dir: Path) -> None:
    from cacovid_rl.eval.evaluate import write_eval_outputs

    _json_path, png_path, flat, rows = write_eval_outputs(result, out_dir / "eval")
    metrics.log(flat, step=int(result["version"]))
    metrics.log_table("eval/accuracy", ["method", "retention", "accuracy"], rows, int(result["version"]), png_path)
