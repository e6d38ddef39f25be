"""``report.md`` (``eval/report_markdown.py``): each section's lines from a hand-written report."""

from __future__ import annotations

from typing import Any

from cacovid_rl.eval.report_markdown import markdown


def _ms(mean: float, std: float = 0.0) -> dict[str, Any]:
    return {"mean": mean, "std": std, "per_seed": [mean]}


def _report(kinds: bool = True, target: bool = True) -> dict[str, Any]:
    table = {
        "n": 10,
        "full": _ms(0.8),
        "uniform": {"0.1": _ms(0.3), "0.5": _ms(0.6)},
        "cacovid": {"0.1": _ms(0.75, 0.05), "0.5": _ms(0.8)},
        "oracle": {"0.1": _ms(1.0)},
        "mystery": {"0.5": _ms(0.5)},
    }
    accuracy: dict[str, Any] = {"all": table}
    if kinds:
        accuracy["colour"] = {"n": 4, "full": _ms(1.0), "cacovid": {"0.1": _ms(0.5)}}
        accuracy["count"] = {"n": 6, "full": _ms(2 / 3)}
    return {
        "runs": [{"name": "seed0", "seed": 0}, {"name": "seed1", "seed": 1}],
        "data": {"path": "data/test.json", "layout": "videor1"},
        "eval": {"n": 10, "skipped_videos": 1},
        "model": "tiny",
        "num_frames": 8,
        "imp_ratio": 1.0,
        "retentions": [0.1, 0.5],
        "accuracy": accuracy,
        "answer_kept": {"n": 10, "full": _ms(1.0), "cacovid": {"0.1": _ms(0.9)}, "oracle": {"0.1": _ms(1.0)}},
        "target": {
            "evaluated": True,
            "retention": 0.1,
            "fraction_of_full": 0.75 / 0.8,
            "fraction_met": False,
            "best_baseline": "uniform",
            "margin_over_best": 0.45,
            "separated": {"uniform": True},
            "met": False,
        }
        if target
        else {"evaluated": False},
        "training": {"seed0": {"updates": 40, "reward/token_mean": {"first_quarter": 0.3, "last_quarter": 0.5}}},
        "command": "cacovid-rl report --run runs/report",
    }


def test_accuracy_table_rows_in_method_order() -> None:
    md = markdown(_report(), {"accuracy": "acc.png", "training": "t.png", "heatmaps": ["h0.png", "h1.png"]})
    lines = md.splitlines()
    start = lines.index("| method | 10% | 50% |")
    assert lines[start + 1 : start + 8] == [
        "|---|---:|---:|",
        "| full tokens | 80.0 ± 0.0 | 80.0 ± 0.0 |",
        "| oracle (answer tokens + random) | 100.0 ± 0.0 | - |",
        "| **cacovid** | 75.0 ± 5.0 | 80.0 ± 0.0 |",
        "| uniform | 30.0 ± 0.0 | 60.0 ± 0.0 |",
        "| mystery | - | 50.0 ± 0.0 |",  # a name the registry does not know comes last
        "| cacovid / full (%) | 94 | 100 |",  # 0.75 / 0.8 and 0.8 / 0.8
    ]
    assert "- runs: 2 seed(s): `seed0` (seed 0), `seed1` (seed 1)" in lines
    assert "- evaluation data: `data/test.json` (videor1 layout), 10 questions, 1 unreadable videos skipped" in lines
    assert "![accuracy vs retention](acc.png)" in lines and "![training curves](t.png)" in lines
    assert lines[lines.index("## What the policy keeps") + 4 : -6] == ["![heatmap](h0.png)", "![heatmap](h1.png)"]


def test_sections_answer_kept_kinds_target_training() -> None:
    md = markdown(_report(), {"accuracy": "acc.png", "training": "t.png", "heatmaps": ["h0.png"]})
    lines = md.splitlines()
    kept = lines.index("## How often the answer's tokens are kept")
    assert "| cacovid | 90.0 ± 0.0 | - |" in lines[kept:] and "| oracle | 100.0 ± 0.0 | - |" not in lines[kept:]
    kinds = lines.index("## Per question kind at 10% retention")
    assert lines[kinds + 2 : kinds + 6] == [
        "| method | colour (n=4) | count (n=6) |",
        "|---|---:|---:|",
        "| full tokens | 100.0 ± 0.0 | 66.7 ± 0.0 |",
        "| oracle | - | - |",
    ]
    assert "| cacovid | 50.0 ± 0.0 | - |" in lines
    target = lines[lines.index("## Target (issue 7)") + 2]
    assert target.startswith("At 10% retention CaCoVID keeps 93.8% of full-token accuracy (target ≥ 95%: no)")
    assert "best non-oracle baseline: uniform, margin +45.0 points" in target and target.endswith("Target **not met**.")
    assert "| seed0 | 40 | 0.300 → 0.500 | - | - |" in lines
    assert "![heatmap](h0.png)" in lines
    assert md.endswith("## Reproduce\n\n```\ncacovid-rl report --run runs/report\n```\n")


def test_optional_sections_are_left_out() -> None:
    report = _report(kinds=False, target=False)
    report["answer_kept"] = {"n": 0}
    md = markdown(report, {"accuracy": "acc.png"})
    assert "## How often" not in md and "## Per question kind" not in md and "## Training" not in md
    assert "## What the policy keeps" not in md and "No CaCoVID result at the target retention." in md
