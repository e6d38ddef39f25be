"""The report's numbers from per-question rows (``eval/aggregate.py``): means and sample std over seeds, per
kind, answer-kept shares, and the target check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cacovid_rl.config import load_config
from cacovid_rl.eval.aggregate import KEPT, SEEDED, aggregate, row_key, target_check
from cacovid_rl.eval.runs import RunInfo

DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug_local.yaml"


def rows_with(runs_acc: dict[str, list[float]], n: int = 10) -> list[dict]:
    """Per-question rows whose per-seed accuracies are exactly the given fractions (full: 8 of the 10 right)."""
    rows = []
    for i in range(n):
        row = {"sample_id": str(i), "kind": "colour" if i % 2 else "count", "full": 1.0 if i < 8 else 0.0}
        for method, per_seed in runs_acc.items():
            for s, acc in enumerate(per_seed):
                key = f"{method}@0.1@seed{s}" if method in SEEDED else f"{method}@0.1"
                row[key] = 1.0 if i < round(acc * n) else 0.0
        rows.append(row)
    return rows


def fake_runs(k: int) -> list[RunInfo]:
    cfg = load_config(DEBUG_CONFIG)
    return [RunInfo(f"seed{s}", Path(f"/x/seed{s}"), cfg, "", Path("p"), Path("m")) for s in range(k)]


def test_row_keys() -> None:
    assert (
        row_key("cacovid", 0.1, "seed2") == "cacovid@0.1@seed2" and row_key("uniform", 0.25, "seed2") == "uniform@0.25"
    )


def test_aggregate_mean_std_and_target() -> None:
    runs = fake_runs(3)
    rows = rows_with({"cacovid": [0.7, 0.7, 0.6], "random": [0.5, 0.4, 0.5], "uniform": [0.5]})
    acc = aggregate(rows, runs, [0.1], ["cacovid", "random", "uniform"])
    assert acc["all"]["full"]["mean"] == pytest.approx(0.8)
    cac = acc["all"]["cacovid"]["0.1"]
    assert cac["mean"] == pytest.approx(0.6667, abs=1e-4) and cac["std"] == pytest.approx(
        np.std([0.7, 0.7, 0.6], ddof=1)
    )
    assert acc["all"]["uniform"]["0.1"]["per_seed"] == [0.5, 0.5, 0.5]  # deterministic: shared by every seed
    assert set(acc) == {"all", "colour", "count"} and acc["colour"]["n"] == 5
    # Per kind: the odd rows 1, 3, 5, 7, 9 are "colour"; seed 0's cacovid is right on rows 0-6: 1, 3, 5 of them.
    assert acc["colour"]["cacovid"]["0.1"]["per_seed"][0] == pytest.approx(3 / 5)
    tgt = target_check(acc)
    assert tgt["fraction_of_full"] == pytest.approx(0.6667 / 0.8, abs=1e-3) and tgt["fraction_met"] is False
    assert tgt["best_baseline"] in ("random", "uniform") and tgt["separated"] == {"random": True, "uniform": True}
    assert tgt["margins"]["uniform"] == pytest.approx(2 / 3 - 0.5) and tgt["met"] is False
    for row, hit in zip(rows, [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0], strict=False):  # answer kept or not
        row.update({f"{KEPT}cacovid@0.1@{run.name}": hit for run in runs})
    kept = aggregate(rows, runs, [0.1], ["cacovid", "uniform"], prefix=KEPT)["all"]
    assert kept["n"] == 8 and "uniform" not in kept  # rows without the key do not count
    assert kept["cacovid"]["0.1"]["mean"] == pytest.approx(0.75)
    rows = rows_with({"cacovid": [0.8, 0.8, 0.8], "random": [0.5, 0.4, 0.8]})
    tgt = target_check(aggregate(rows, runs, [0.1], ["cacovid", "random"]))
    assert tgt["fraction_met"] and not tgt["separated"]["random"] and not tgt["met"]  # seed ranges overlap
    assert target_check(aggregate(rows, runs, [0.5], ["cacovid"])) == {"evaluated": False}
