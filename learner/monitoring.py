"""Monitoring a user can act on: cluster throughput, per-actor spread, device memory, sample answers.

wandb's own system monitor runs in the driver, on a cluster's GPU-less head node, so it sees no GPU. Every reward
actor and the learner therefore measure their own device (``cacovid_rl.device_stats``) and send the readings with
their results; this module turns them into the logged metrics:

- ``perf/combos_per_s``, ``perf/questions_per_s``, ``perf/video_tokens_per_s``, ``perf/kept_tokens_per_s``: what the
  whole pool finished per wall second since the previous update (from the actors' cumulative counters, so no
  finished item is missed or counted twice however the statuses arrive). Video tokens are the questions' ``T * N``
  tokens (encoded and scored once per question); kept tokens the ones the LLM read to score the combinations.
- ``perf/actor_<x>_min`` / ``_max`` (and ``mem/actor_<x>_min`` / ``_max``) over the live actors: a straggler or a
  starved actor shows as a low min, an actor near its memory limit as a high max.
- ``mem/learner_*``, ``perf/learner_*``: the learner's own readings (``Learner.update`` adds them).
- ``eval/samples``: a wandb table of a few evaluation questions with the policy's answer, reward and a picture of
  the tokens it kept (``cacovid_rl/eval/samples.py`` computes them in the evaluation task).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cacovid_rl.rl.worker import ActorReport, RolloutStatus

log = logging.getLogger(__name__)

# The cumulative counters every reward actor reports (``ActorReport.totals``, actors/reward_actor.py).
_COUNTERS = ("items", "combos", "video_tokens", "kept_tokens")


@dataclass
class _Seen:
    """An actor's cumulative counters at the previous reading (``incarnation`` tells a restarted actor apart)."""

    incarnation: tuple[Any, ...]
    totals: dict[str, float]
    busy_s: float


def _spread(out: dict[str, float], prefix: str, values: Sequence[float | None]) -> None:
    """``<prefix>_min`` and ``<prefix>_max`` of ``values`` (nothing when there are none)."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if vals:
        out[prefix + "_min"] = float(min(vals))
        out[prefix + "_max"] = float(max(vals))


class ClusterMonitor:
    """Turns the latest status of every reward actor into cluster-wide and per-actor metrics, once per update.

    Stateful: it keeps each actor's counters from the previous call, so rates cover exactly the work finished
    between two calls (``dt`` seconds of wall clock). The driver makes one before its loop and calls
    :meth:`metrics` at every update.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()
        self._seen: dict[str, _Seen] = {}

    def metrics(
        self, stats: Mapping[str, RolloutStatus], live: Collection[str] | None = None, dt: float | None = None
    ) -> dict[str, float]:
        """Metrics from ``stats`` (actor id -> its latest status). ``live``: the ids of the actors in the pool now
        (the rest are removed actors whose last status would otherwise count as a stalled actor); ``dt``: the
        window in seconds (default: the clock since the previous call; on the first call at most the longest time
        an actor has been up, so the start-up wait does not dilute the first rates). Statuses without an actor's
        report (not from a reward actor) are left out."""
        now = self._clock()
        dt = now - self._last if dt is None else dt
        self._last = now
        if not stats:
            return {}
        live_stats = [s for a, s in stats.items() if (live is None or a in live) and s.actor is not None]
        if not live_stats:
            return {"perf/actors_reporting": 0.0}
        reports = [s.actor for s in live_stats if s.actor is not None]
        if not self._seen:
            # The first window would include the actors' model loading (nothing finishes then); their ``alive_s``
            # (time since the actor became ready, at its latest status) bounds the time they could work.
            alive = [r.alive_s for r in reports if r.alive_s > 0]
            dt = min(dt, max(alive)) if alive else dt
        window = max(dt, 1e-9)
        out = status_metrics(live_stats)
        deltas = [self._delta(s.actor_id, r) for s, r in zip(live_stats, reports, strict=True)]
        out["perf/combos_per_s"] = sum(d["combos"] for d in deltas) / window
        out["perf/questions_per_s"] = sum(d["items"] for d in deltas) / window
        out["perf/video_tokens_per_s"] = sum(d["video_tokens"] for d in deltas) / window
        out["perf/kept_tokens_per_s"] = sum(d["kept_tokens"] for d in deltas) / window
        _spread(out, "perf/actor_combos_per_s", [d["combos"] / window for d in deltas])
        _spread(out, "perf/actor_video_tokens_per_s", [d["video_tokens"] / window for d in deltas])
        # Share of the window each actor spent on items: low = starved (the driver or learner is the bottleneck).
        busy = [min(1.0, d["busy_s"] / window) for d in deltas]
        _spread(out, "perf/actor_busy", busy)
        out["perf/actor_busy_mean"] = float(np.mean(busy))
        out["perf/actors_reporting"] = float(len(live_stats))
        out.update(actor_device_metrics(reports))
        return out

    def _delta(self, actor_id: str, report: ActorReport) -> dict[str, float]:
        """The work ``actor_id`` finished since its previous reading (all of it for a new or restarted actor)."""
        cur = {k: float(report.totals.get(k, 0.0)) for k in _COUNTERS}
        # A restarted actor keeps its actor id but starts its counters at 0 in a new process.
        inc = (report.pid, report.actor_started)
        prev = self._seen.get(actor_id)
        if prev is None or prev.incarnation != inc or any(cur[k] < prev.totals[k] for k in _COUNTERS):
            prev = _Seen(inc, dict.fromkeys(_COUNTERS, 0.0), 0.0)
        d = {k: cur[k] - prev.totals[k] for k in _COUNTERS}
        d["busy_s"] = max(0.0, report.busy_s - prev.busy_s)
        self._seen[actor_id] = _Seen(inc, cur, report.busy_s)
        return d


def status_metrics(statuses: Sequence[RolloutStatus]) -> dict[str, float]:
    """Means over the actors' latest statuses: utilisation, weight sync, per-item speed and timings."""
    reports = [s.actor for s in statuses if s.actor is not None]
    if not reports:
        return {}
    ok = [s for s in statuses if s.ok]
    out = {
        "perf/actor_utilisation": float(np.mean([r.busy_s / max(1e-9, r.alive_s) for r in reports])),
        "sync/latency_s": float(np.mean([r.sync_latency_s for r in reports])),
        "sync/load_s": float(np.mean([r.sync_load_s for r in reports])),
        "sync/latency_s_max": float(max(r.sync_latency_s for r in reports)),
    }
    if ok:
        out["perf/combos_per_s_per_actor"] = float(np.mean([s.combos / max(1e-9, s.elapsed_s) for s in ok]))
        out["timing/score"] = float(np.mean([s.timings["score"] for s in ok]))
        out["timing/encode"] = float(np.mean([s.timings["encode"] for s in ok]))
    return out


def actor_device_metrics(reports: Sequence[ActorReport]) -> dict[str, float]:
    """Spread of the actors' own device readings (``ActorReport.device``, ``cacovid_rl.device_stats``)."""
    devs = [r.device for r in reports if r.device]
    if not devs:
        return {}
    out: dict[str, float] = {}
    _spread(out, "mem/actor_peak_gb", [d.get("peak_gb") for d in devs])
    _spread(out, "mem/actor_mem_gb", [d.get("mem_gb") for d in devs])
    _spread(out, "mem/actor_rss_gb", [d.get("rss_gb") for d in devs])
    _spread(out, "perf/actor_cpu_util", [d.get("cpu_util") for d in devs])
    gpus = [d for d in devs if d.get("on_gpu")]
    if gpus:
        _spread(out, "mem/actor_allocated_peak_gb", [d.get("allocated_peak_gb") for d in gpus])
        _spread(out, "mem/actor_peak_frac", [d.get("peak_frac") for d in gpus])
        _spread(out, "perf/actor_gpu_util", [d.get("gpu_util") for d in gpus])
    return out


def learner_metrics(dev: Mapping[str, float], busy_s: float, wall_s: float, combos: int) -> dict[str, float]:
    """The learner's own readings under their logged names.

    ``busy_s``: this update's fetch and optimiser time; ``wall_s``: the wall time since the previous update began
    (so ``perf/learner_busy`` below 1 is the share the learner waited for rollouts); ``combos``: the combinations
    this update trained on.
    """
    out = {
        "mem/learner_peak_gb": float(dev["peak_gb"]),
        "mem/learner_mem_gb": float(dev["mem_gb"]),
        "mem/learner_rss_gb": float(dev["rss_gb"]),
        "perf/learner_cpu_util": float(dev["cpu_util"]),
        "perf/learner_busy": min(1.0, busy_s / wall_s) if wall_s > 0 else 1.0,
        "perf/learner_combos_per_s": combos / max(1e-9, busy_s),
    }
    for src, dst in (
        ("allocated_peak_gb", "mem/learner_allocated_peak_gb"),
        ("peak_frac", "mem/learner_peak_frac"),
        ("gpu_util", "perf/learner_gpu_util"),
    ):
        if src in dev:
            out[dst] = float(dev[src])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# sample answers


SAMPLE_COLUMNS = [
    "sample_id",
    "question",
    "answer",
    "ground_truth",
    "reward",
    "kept_tokens",
    "total_tokens",
    "retention",
    "kept_tokens_image",
]


def sample_rows(samples: list[Mapping[str, Any]], image_dir: Path, version: int) -> list[list[Any]]:
    """wandb-table rows of ``samples`` (``cacovid_rl.eval.samples.sample_questions``), columns :data:`SAMPLE_COLUMNS`.

    Each sample's picture is written to ``image_dir/samples_v<version>_<i>.png`` (it stays beside the evaluation
    JSON) and goes into the table as a ``wandb.Image`` (its path where wandb is not installed).
    """
    image_dir.mkdir(parents=True, exist_ok=True)
    try:
        import wandb

        image: Callable[[str], Any] = wandb.Image
    except ImportError:
        image = str
    rows = []
    for i, s in enumerate(samples):
        cell: Any = None
        if s.get("png_b64"):
            path = image_dir / f"samples_v{int(version):06d}_{i}.png"
            path.write_bytes(base64.b64decode(s["png_b64"]))
            cell = image(str(path))
        rows.append(
            [
                str(s["sample_id"]),
                str(s["question"]),
                str(s["answer"]),
                str(s["ground_truth"]),
                float(s["reward"]),
                int(s["kept_tokens"]),
                int(s["total_tokens"]),
                float(s["retention"]),
                cell,
            ]
        )
    return rows


def log_samples(metrics: Any, result: dict[str, Any], image_dir: Path, key: str = "eval/samples") -> int:
    """Take ``result["samples"]`` out of an evaluation result and log them as one wandb table at its version.

    Popped so that the evaluation JSON keeps its size and format. Never raises: a monitoring failure must not cost
    the evaluation's accuracy numbers. Returns the number of rows logged.
    """
    samples = result.pop("samples", None) or []
    if not samples:
        return 0
    try:
        version = int(result.get("version", 0))
        rows = sample_rows(samples, Path(image_dir), version)
        metrics.log_table(key, SAMPLE_COLUMNS, rows, version)
        return len(rows)
    except Exception as exc:
        log.warning("sample-answer table not logged: %s", " ".join(str(exc).split())[-300:])
        return 0
