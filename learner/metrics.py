"""Metrics: a JSONL file that always works, plus wandb when it works.

wandb runs ``offline`` by default (``wandb sync`` uploads later); any wandb failure is reported once
and then ignored, because a monitoring outage must never stop a 40-hour training run.

A resumed run restarts from its checkpoint's step, so whatever was logged after that step (a run killed
between checkpoints) is cut from the JSONL and wandb is asked to rewind to it: each update appears once. A fresh
run into a directory that holds metrics keeps them as ``metrics.jsonl.prev<N>`` and starts a new wandb run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cacovid_rl.config import Config

log = logging.getLogger(__name__)
STEP_KEY = "update"


class StageTimer:
    """Wall time per named stage, summed until :meth:`take` (``with timer("update"): ...``).

    The driver takes the sums once per update, so ``timing/<stage>`` is the time the loop spent in that stage since
    the previous update, over however many turns of the loop that took.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._sums: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            self._sums[stage] = self._sums.get(stage, 0.0) + self._clock() - t0

    def take(self) -> dict[str, float]:
        """``{"timing/<stage>": seconds}`` since the last take (a stage still open counts at its end, in the next)."""
        out = {f"timing/{k}": v for k, v in self._sums.items()}
        self._sums = {}
        return out


def cut_metrics(path: Path, step: int) -> int:
    """Drop the lines of ``path`` logged after ``step`` (and a torn last line); returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if isinstance(row_step, (int, float)) and row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def _set_aside(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.prev{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.prev{n}")
    path.rename(target)
    return target


class MetricsLogger:
    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path,
        resume_step: int = 0,
        resumed: bool | None = None,
        wandb_step: int | None = None,
    ) -> None:
        """``resumed`` (default: ``resume_step > 0``) continues the run's JSONL cut back to ``resume_step`` and its
        wandb run (rewound to ``wandb_step``, wandb's own step at that checkpoint, where the backend supports it)."""
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resumed = resume_step > 0 if resumed is None else resumed
        if resumed:
            dropped = cut_metrics(self.path, resume_step)
            if dropped:
                log.warning("metrics.jsonl: dropped %d lines logged after checkpoint step %d", dropped, resume_step)
        elif self.path.is_file() and self.path.stat().st_size:
            log.warning("%s holds an earlier run's metrics: kept as %s", self.path, _set_aside(self.path))
        self._wandb = None
        if cfg.wandb.mode != "disabled":
            try:
                import wandb

                # A resumed run continues the same wandb run: its id lives beside the metrics.
                id_file = Path(out_dir) / "wandb_run_id"
                run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:12]
                id_file.write_text(run_id + "\n")
                where: dict[str, Any] = {"id": run_id, "resume": "allow"}
                if resumed and wandb_step is not None and cfg.wandb.mode == "online":
                    # Rewind: the steps logged after the checkpoint are replaced, not shown twice.
                    where = {"resume_from": f"{run_id}?_step={wandb_step}"}
                self._wandb = wandb.init(
                    **where,
                    project=cfg.wandb.project,
                    entity=cfg.wandb.entity or None,
                    name=cfg.wandb.run_name or None,
                    mode=cfg.wandb.mode,
                    dir=str(Path(out_dir)),
                    config=cfg.to_dict(),
                )
                # Every chart's x-axis is the policy version ("update"), not wandb's own step: evaluations
                # arrive after later training steps were logged, and wandb drops any step=... that is not
                # monotonically increasing ("Tried to log to step 25 that is less than the current step 34").
                self._wandb.define_metric(STEP_KEY)
                self._wandb.define_metric("*", step_metric=STEP_KEY)
            except Exception as exc:  # any wandb failure: keep training, say so once
                log.warning("wandb disabled for this run: %s", exc)
                self._wandb = None

    @property
    def wandb_step(self) -> int | None:
        """wandb's own step counter now (stored in checkpoints so a resume can rewind to it)."""
        try:
            return int(self._wandb.step) if self._wandb is not None else None
        except (AttributeError, TypeError, ValueError):
            return None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **clean}) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({**clean, STEP_KEY: step})
            except Exception as exc:
                log.warning("wandb.log failed, continuing without wandb: %s", exc)
                self._wandb = None

    def log_table(
        self, key: str, columns: list[str], rows: list[list[Any]], step: int, image: str | None = None
    ) -> None:
        if self._wandb is None:
            return
        try:
            import wandb

            payload: dict[str, Any] = {key: wandb.Table(columns=columns, data=rows)}
            if image:
                payload[key + "_plot"] = wandb.Image(image)
            self._wandb.log({**payload, STEP_KEY: step})
        except Exception as exc:
            log.warning("wandb table logging failed: %s", exc)

    def close(self) -> None:
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as exc:
                log.warning("wandb.finish failed: %s", exc)
