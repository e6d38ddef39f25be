"""The report's numbers from its per-question rows: accuracy mean and std over seeds, per method, retention and
question kind, how often a selection keeps the answer's tokens, and the target check.

A row holds one question's rewards: ``full``, ``<method>@<retention>`` for a method that does not depend on the
seed (answered once) and ``<method>@<retention>@<run>`` for one that does (:data:`SEEDED`); with the :data:`KEPT`
prefix, whether that selection kept an answer (oracle) token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cacovid_rl.eval.runs import RunInfo

SEEDED = ("cacovid", "random", "oracle")
"""Methods whose selections differ between seeds (the policy, or a seeded random draw)."""
KEPT = "kept:"
"""Row-key prefix: did the selection keep an answer (oracle) token."""
TARGET_RETENTION = 0.10
"""The headline retention (README, report heatmaps, the wandb samples of the periodic evaluation)."""
TARGET_FRACTION = 0.95
"""The target's share of full-token accuracy at :data:`TARGET_RETENTION`."""


def row_key(method: str, retention: float, run: str = "") -> str:
    """The row key of a method at a retention: with the run's name for a :data:`SEEDED` method."""
    return f"{method}@{retention}@{run}" if method in SEEDED else f"{method}@{retention}"


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()) if arr.size else float("nan"), "std": std, "per_seed": [float(v) for v in arr]}


def aggregate(
    rows: list[dict[str, Any]],
    runs: Sequence[RunInfo],
    retentions: Sequence[float],
    methods: Sequence[str],
    prefix: str = "",
) -> dict[str, Any]:
    """Accuracy per (method, retention): mean and sample std over seeds, overall and per question kind.

    ``prefix=KEPT`` aggregates instead how often a selection kept an answer token (questions with oracle
    tokens only; ``full`` is then the share of such questions).
    """
    names = [r.name for r in runs]
    kinds = sorted({row["kind"] for row in rows})

    def per_seed(subset: list[dict[str, Any]], method: str, ret: float) -> list[float]:
        out = []
        for name in names:
            key = prefix + row_key(method, ret, name)
            vals = [row[key] for row in subset if key in row]
            out.append(float(np.mean(vals)) if vals else float("nan"))
        return out

    def table(subset: list[dict[str, Any]]) -> dict[str, Any]:
        if prefix:
            subset = [r for r in subset if any(k.startswith(prefix) for k in r)]
        full = np.mean([r["full"] for r in subset]) if subset else float("nan")
        t: dict[str, Any] = {"n": len(subset), "full": _mean_std([full] * len(names))}
        for m in methods:
            per = {}
            for ret in retentions:
                vals = per_seed(subset, m, ret)
                if not all(math.isnan(v) for v in vals):
                    per[str(ret)] = _mean_std(vals)
            if per:
                t[m] = per
        return t

    out = {"all": table(rows)}
    for k in kinds:
        out[k] = table([r for r in rows if r["kind"] == k])
    return out


def target_check(acc: dict[str, Any], retention: float = TARGET_RETENTION) -> dict[str, Any]:
    """The target at ``retention``: CaCoVID >= 95% of full tokens, and a clear margin over every baseline.

    "Clear margin" is read as: the CaCoVID mean is above every non-oracle baseline's mean, and CaCoVID's
    worst seed is above that baseline's best seed (the seeds' ranges do not overlap).
    """
    key = str(retention)
    table = acc["all"]
    if "cacovid" not in table or key not in table["cacovid"]:
        return {"evaluated": False}
    cac = table["cacovid"][key]
    full = table["full"]["mean"]
    baselines = {m: v[key] for m, v in table.items() if m not in ("n", "full", "cacovid", "oracle") and key in v}
    best = max(baselines, key=lambda m: baselines[m]["mean"]) if baselines else None
    fraction = cac["mean"] / full if full > 0 else float("nan")
    margins = {m: cac["mean"] - v["mean"] for m, v in baselines.items()}
    separated = {m: min(cac["per_seed"]) > max(v["per_seed"]) for m, v in baselines.items()}
    return {
        "evaluated": True,
        "retention": retention,
        "cacovid": cac,
        "full": full,
        "fraction_of_full": fraction,
        "fraction_met": bool(fraction >= TARGET_FRACTION),
        "best_baseline": best,
        "margin_over_best": margins.get(best, float("nan")) if best else float("nan"),
        "margins": margins,
        "separated": separated,
        "margin_met": bool(best is not None and all(separated.values()) and min(margins.values()) > 0),
        "met": bool(fraction >= TARGET_FRACTION and best is not None and all(separated.values())),
    }
