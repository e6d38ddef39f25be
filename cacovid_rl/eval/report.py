"""``cacovid-rl report``: the evaluation report of trained runs (JSON + Markdown + PNG plots).

``--run`` is a run directory (``policy/``, ``metrics.jsonl`` and its resolved config, written by
``cacovid-rl train``) or a parent of several seeds' run directories. For every seed the trained policy is
evaluated on the held-out split at several retentions (``--retentions``, default the config's ``eval.retentions``
default: 5/10/25/50%) against full tokens, the training-free baselines (``--baselines``, default the config's
``eval.baselines`` default: every method of ``cacovid_rl.baselines.METHODS``, selecting (uniform, random, FastV,
VisionZip, DivPrune, VidCom2) or merging (PruneVid, FrameFusion, FlashVID, FastVID)) and, where the records say
which tokens hold the answer (the synthetic data's ``meta.oracle_tokens``), an oracle reference. The report holds:

- ``report.json``: every number (per seed, per method, per retention, per question kind), the target check;
  ``per_question.json``: every question's reward under every (method, retention, seed), as a table;
- ``report.md``: accuracy mean +- std over seeds per method and retention, per kind, the target verdict;
- ``accuracy_vs_retention.png``, ``training_curves.png`` (reward, eval accuracy, rate, loss from
  ``metrics.jsonl``) and ``heatmap_<i>.png``: a few test questions' frames with the policy's token scores
  overlaid, the kept tokens outlined and the oracle tokens marked.

The evaluation data defaults to the run config's ``data.eval_path``; it may be a Video-R1 / CaCoVID JSON
(the synthetic split) or a real benchmark file in its lmms-eval layout (Video-MME, MLVU, LongVideoBench;
see ``cacovid_rl.eval.benchmarks``). The rooms: ``runs`` (run discovery, configs, metrics), ``report_eval``
(the seeds and baselines through the one evaluation loop, ``evaluate.answer_questions``: each video decoded and
encoded once, deterministic baselines answered once for all seeds), ``aggregate`` (means over seeds, the
target), ``plots`` and ``report_markdown``; this module puts them together.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cacovid_rl.config import ConfigError, EvalConfig
from cacovid_rl.eval.aggregate import KEPT, aggregate, target_check
from cacovid_rl.eval.plots import Question, plot_accuracy, plot_heatmap, plot_training
from cacovid_rl.eval.report_eval import HEATMAP_QUESTIONS, EvalSet, evaluate_runs, load_eval_set
from cacovid_rl.eval.report_markdown import markdown
from cacovid_rl.eval.runs import RunInfo, load_runs, training_summary

__all__ = ["build_parser", "main"]  # the command line's entry points

_DEFAULTS = EvalConfig()
"""The report's default retentions and methods: the config's ``eval`` defaults (all 5/10/25/50% and every
training-free method), not a run's ``eval`` section, which holds the periodic evaluation's cheap subset."""


def _compact(v: Any) -> Any:
    """Rewards as ints when whole (most are 0/1), else rounded floats; None stays None."""
    if v is None:
        return None
    return int(v) if float(v).is_integer() else round(float(v), 4)


def _arg(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value in (None, "", []) else value


class _InputError(Exception):
    """A run, config or evaluation file the report cannot use: printed as ``error: ...``, exit code 2."""


def _inputs(args: argparse.Namespace) -> tuple[list[RunInfo], EvalSet, str]:
    """The runs and the evaluation set of ``args`` (the data defaults to the first run's ``data.eval_path``)."""
    from cacovid_rl.eval.benchmarks import BenchmarkError

    try:
        runs = load_runs(Path(args.run), _arg(args, "config", None))
    except (FileNotFoundError, ConfigError) as exc:
        raise _InputError(str(exc)) from exc
    cfg = runs[0].cfg
    data_path = _arg(args, "data", cfg.data.eval_path)
    if not data_path:
        raise _InputError("no evaluation data: the run config has no data.eval_path; pass --data")
    video_root = _arg(args, "video_root", cfg.data.video_root if data_path == cfg.data.eval_path else None)
    try:
        data = load_eval_set(data_path, video_root, _arg(args, "layout", "auto"))
    except (BenchmarkError, ValueError, OSError) as exc:
        raise _InputError(str(exc)) from exc
    if not data.records:
        raise _InputError(f"no usable records in {data_path}: {data.skipped} ({data.errors[:3]})")
    return runs, data, str(data_path)


def _per_question_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``per_question.json``: one row per question, one column per reward (sorted), compact numbers."""
    columns = sorted({k for row in rows for k in row} - {"sample_id", "kind"})
    return {
        "columns": ["sample_id", "kind", *columns],
        "rows": [[row["sample_id"], row["kind"], *[_compact(row.get(c)) for c in columns]] for row in rows],
    }


def _plots(report: dict[str, Any], runs: list[RunInfo], heat: list[Question], out: Path) -> dict[str, Any]:
    """Every PNG of the report into ``out``; returns their names as ``markdown`` links them."""
    images: dict[str, Any] = {"accuracy": "accuracy_vs_retention.png"}
    title = (
        f"accuracy vs retention, model {report['model']} ({len(runs)} seed(s), n={report['eval']['n']}, "
        f"{Path(report['data']['path']).name})"
    )
    plot_accuracy(report["accuracy"]["all"], report["retentions"], out / images["accuracy"], title)
    if plot_training(runs, out / "training_curves.png") is not None:
        images["training"] = "training_curves.png"
    images["heatmaps"] = []
    for i, q in enumerate(heat):
        name = f"heatmap_{i}.png"
        plot_heatmap(q, out / name)
        images["heatmaps"].append(name)
    return images


def main(args: argparse.Namespace) -> int:
    """Build the report for ``args.run`` into ``args.out`` (default ``<run>/report``); returns an exit code.

    Optional attributes (``python -m cacovid_rl.eval.report --help``): ``data``, ``video_root``, ``layout``,
    ``retentions``, ``baselines``, ``max_samples``, ``device``, ``config`` (fallback when a run has no resolved
    config), ``heatmaps``, ``quiet``.
    """
    run_root = Path(args.run)
    out = Path(_arg(args, "out", run_root / "report"))
    try:
        runs, data, data_path = _inputs(args)
    except _InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = runs[0].cfg
    retentions = tuple(float(r) for r in _arg(args, "retentions", _DEFAULTS.retentions))
    out.mkdir(parents=True, exist_ok=True)
    result, heat = evaluate_runs(
        runs,
        data,
        retentions=retentions,
        baselines=tuple(_arg(args, "baselines", _DEFAULTS.baselines)),
        max_samples=int(_arg(args, "max_samples", 0)),
        device=_arg(args, "device", ""),
        heatmap_questions=int(_arg(args, "heatmaps", HEATMAP_QUESTIONS)),
        progress=not getattr(args, "quiet", False),
    )
    methods = [*result["meta"]["seeded_methods"], *result["meta"]["shared_methods"]]
    acc = aggregate(result["rows"], runs, retentions, methods)
    report: dict[str, Any] = {
        "runs": [{"name": r.name, "path": str(r.path), "seed": r.cfg.seed, "config": r.config_source} for r in runs],
        "data": {"path": data_path, "layout": data.layout, "skipped": data.skipped, "errors": data.errors[:20]},
        "model": cfg.model.path,
        "num_frames": cfg.data.num_frames,
        "imp_ratio": cfg.eval.imp_ratio,
        "retentions": list(retentions),
        "eval": result["meta"],
        "accuracy": acc,
        "target": target_check(acc),
        "answer_kept": aggregate(result["rows"], runs, retentions, methods, prefix=KEPT)["all"],
        "training": training_summary(runs),
        "command": f"cacovid-rl report --run {run_root}" + (f" --out {args.out}" if getattr(args, "out", "") else ""),
    }
    images = _plots(report, runs, heat, out)
    report["images"] = images
    report["per_question"] = "per_question.json"
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "per_question.json").write_text(
        json.dumps(_per_question_table(result["rows"]), separators=(",", ":")) + "\n"
    )
    (out / "report.md").write_text(markdown(report, images))
    n_png = 1 + len(images["heatmaps"]) + ("training" in images)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {n_png} PNGs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cacovid_rl.eval.report", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (or a parent of several seeds' runs)")
    p.add_argument("--out", default="", help="report directory (default: <run>/report)")
    p.add_argument("--data", default="", help="evaluation file (default: the run config's data.eval_path)")
    p.add_argument("--video-root", dest="video_root", default="", help="directory the videos are under")
    p.add_argument("--layout", default="auto", help="videomme | mlvu | longvideobench | videor1 | auto")
    default_rets = "/".join(f"{r * 100:g}" for r in _DEFAULTS.retentions)
    p.add_argument(
        "--retentions", type=float, nargs="+", default=None, help=f"retention ratios (default {default_rets}%%)"
    )
    p.add_argument("--max-samples", dest="max_samples", type=int, default=0, help="evaluate at most N questions")
    p.add_argument("--device", default="", help="override model.device (e.g. cuda)")
    p.add_argument("--config", default="", help="YAML config for runs without a resolved config")
    p.add_argument(
        "--baselines",
        nargs="+",
        default=None,
        help=f"compression methods of cacovid_rl.baselines.METHODS (default: {' '.join(_DEFAULTS.baselines)})",
    )
    p.add_argument("--heatmaps", type=int, default=HEATMAP_QUESTIONS, help="number of heatmap questions")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(build_parser().parse_args()))
