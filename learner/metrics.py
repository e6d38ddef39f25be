"""Metrics: a JSONL file that always works, plus wandb when it works.

wandb runs ``offline`` by default (``wandb sync`` uploads later); any wandb failure is reported once
and then ignored, because a monitoring outage must never stop a 40-hour training run.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any

from cacovid_rl.config import Config

log = logging.getLogger(__name__)
STEP_KEY = "update"


class MetricsLogger:
    def __init__(self, cfg: Config, out_dir: str | Path, resume_step: int = 0) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb = None
        if cfg.wandb.mode != "disabled":
            try:
                import wandb

                # A resumed run continues the same wandb run: its id lives beside the metrics.
                id_file = Path(out_dir) / "wandb_run_id"
                run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
                id_file.write_text(run_id + "\n")
                self._wandb = wandb.init(
                    id=run_id,
                    project=cfg.wandb.project,
                    entity=cfg.wandb.entity or None,
                    name=cfg.wandb.run_name or None,
                    mode=cfg.wandb.mode,
                    dir=str(Path(out_dir)),
                    config=cfg.to_dict(),
                    resume="allow",
                )
                # Every chart's x-axis is the policy version ("update"), not wandb's own step: evaluations
                # arrive after later training steps were logged, and wandb drops any step=... that is not
                # monotonically increasing ("Tried to log to step 25 that is less than the current step 34").
                self._wandb.define_metric(STEP_KEY)
                self._wandb.define_metric("*", step_metric=STEP_KEY)
            except Exception as exc:  # any wandb failure: keep training, say so once
                log.warning("wandb disabled for this run: %s", exc)
                self._wandb = None

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
