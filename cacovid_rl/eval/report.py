"""``cacovid-rl report``: the evaluation report of trained runs (JSON + Markdown + PNG plots).

``--run`` is a run directory (``policy/``, ``metrics.jsonl`` and its resolved config, written by
``cacovid-rl train``) or a parent of several seeds' run directories. For every seed the trained policy is
evaluated on the held-out split at several retentions against full tokens, the training-free baselines
(``--baselines``, default all of ``cacovid_rl.baselines.METHODS``: selecting
(uniform, random, FastV, VisionZip, DivPrune, VidCom2) or merging (PruneVid, FrameFusion, FlashVID, FastVID))
and, where the records say which tokens hold the answer
(the synthetic data's ``meta.oracle_tokens``), an oracle reference. The report holds:

- ``report.json``: every number (per seed, per method, per retention, per question kind), the target check;
  ``per_question.json``: every question's reward under every (method, retention, seed), as a table;
- ``report.md``: accuracy mean +- std over seeds per method and retention, per kind, the target verdict;
- ``accuracy_vs_retention.png``, ``training_curves.png`` (reward, eval accuracy, rate, loss from
  ``metrics.jsonl``) and ``heatmap_<i>.png``: a few test questions' frames with the policy's token scores
  overlaid, the kept tokens outlined and the oracle tokens marked.

The evaluation data defaults to the run config's ``data.eval_path``; it may be a Video-R1 / CaCoVID JSON
(the synthetic split) or a real benchmark file in its lmms-eval layout (Video-MME, MLVU, LongVideoBench;
see ``cacovid_rl.eval.benchmarks``). Each video is decoded and encoded once per report; deterministic
baselines are answered once and shared by all seeds; all compressed blocks of one retention (equal token
counts, kept or merged) are answered in one batched LLM call. For a merging method, "kept an answer token"
counts the tokens merged into its output too (``CompressedVideo.covered``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cacovid_rl.baselines import METHODS
from cacovid_rl.config import Config, ConfigError, from_dict, load_config
from cacovid_rl.data.records import QARecord

log = logging.getLogger("cacovid_rl.report")

RETENTIONS = (0.05, 0.10, 0.25, 0.50)
BASELINES = tuple(m for m in METHODS if m != "cacovid")
"""Every training-free method of ``cacovid_rl.baselines.METHODS`` (the report compares the policy with all)."""
SEEDED = ("cacovid", "random", "oracle")
KEPT = "kept:"  # row-key prefix: did the selection keep an answer (oracle) token
"""Methods whose selections differ between seeds (the policy, or a seeded random draw)."""
TARGET_RETENTION = 0.10
TARGET_FRACTION = 0.95
CONFIG_FILES = ("config.yaml", "resolved_config.yaml", "config.json")
HEATMAP_QUESTIONS = 4
MAX_HEATMAP_FRAMES = 8
COLOURS = {
    "full": "black",
    "oracle": "grey",
    "cacovid": "tab:red",
    "uniform": "tab:blue",
    "random": "tab:orange",
    "fastv": "tab:green",
    "visionzip": "tab:purple",
    "divprune": "tab:brown",
    "vidcom2": "tab:pink",
    "prunevid": "tab:olive",
    "framefusion": "tab:cyan",
    "flashvid": "gold",
    "fastvid": "darkblue",
}


# ----------------------------------------------------------------------------------------------------------------------
# runs


@dataclass
class RunInfo:
    name: str
    path: Path
    cfg: Config
    config_source: str
    policy_dir: Path
    metrics_path: Path


def is_run_dir(path: Path) -> bool:
    return (path / "policy" / "policy_config.json").is_file() or (path / "metrics.jsonl").is_file()


def discover_runs(root: str | Path) -> list[Path]:
    """``root`` itself when it is a run directory, else its run subdirectories (two levels deep), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory '{root}' does not exist")
    if is_run_dir(root):
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and is_run_dir(p))
    if not found:
        found = sorted(q for p in root.iterdir() if p.is_dir() for q in p.iterdir() if q.is_dir() and is_run_dir(q))
    if not found:
        raise FileNotFoundError(f"no run directories (with policy/ or metrics.jsonl) under '{root}'")
    return found


def _unwrap_wandb(raw: dict[str, Any]) -> dict[str, Any]:
    """wandb's config.yaml stores ``key: {value: ...}``; keep only the values of config sections."""
    out = {}
    for k, v in raw.items():
        if k.startswith("_") or k == "wandb_version":
            continue
        out[k] = v["value"] if isinstance(v, dict) and "value" in v else v
    return out


def load_run_config(run: Path, fallback: str | Path | None = None) -> tuple[Config, str]:
    """The run's resolved config: ``config.yaml``/``resolved_config.yaml``/``config.json`` in the run directory,
    else the wandb run's ``files/config.yaml``, else ``fallback`` (a YAML config) when given."""
    for name in CONFIG_FILES:
        p = run / name
        if p.is_file():
            raw = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
            return from_dict(raw or {}), str(p)
    for p in sorted(run.glob("wandb/*run-*/files/config.yaml")):
        try:
            return from_dict(_unwrap_wandb(yaml.safe_load(p.read_text()) or {})), str(p)
        except ConfigError as exc:
            log.warning("ignoring %s: %s", p, exc)
    if fallback:
        return load_config(fallback), f"{fallback} (fallback: no resolved config in {run})"
    raise FileNotFoundError(
        f"no resolved config in '{run}' (looked for {', '.join(CONFIG_FILES)} and wandb/*/files/config.yaml); "
        "pass --config with the YAML the run was trained with"
    )


def load_runs(root: str | Path, fallback_config: str | Path | None = None) -> list[RunInfo]:
    runs = []
    for path in discover_runs(root):
        cfg, source = load_run_config(path, fallback_config)
        runs.append(
            RunInfo(path.name, path, cfg, source, path / "policy", path / "metrics.jsonl"),
        )
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# evaluation data


@dataclass
class EvalSet:
    records: list[QARecord]
    oracle: dict[str, list[int]]
    kinds: dict[str, str]
    layout: str
    path: str
    skipped: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _kind(rec: QARecord) -> str:
    source = rec.data_source or rec.problem_type
    return source.split("/", 1)[1] if "/" in source else source


def load_eval_set(path: str | Path, video_root: str | Path | None = None, layout: str = "auto") -> EvalSet:
    """Records of a Video-R1 / synthetic JSON or a benchmark file, plus oracle tokens where records carry them."""
    from cacovid_rl.eval.benchmarks import load_benchmark

    report, used = load_benchmark(path, video_root, layout)
    oracle: dict[str, list[int]] = {}
    if used == "videor1":
        for raw in json.loads(Path(path).read_text()):
            meta = raw.get("meta") if isinstance(raw, dict) else None
            sid = raw.get("problem_id", raw.get("id")) if isinstance(raw, dict) else None
            if isinstance(meta, dict) and sid is not None and isinstance(meta.get("oracle_tokens"), list):
                oracle[str(sid)] = [int(i) for i in meta["oracle_tokens"]]
    kinds = {r.sample_id: _kind(r) for r in report.records}
    return EvalSet(report.records, oracle, kinds, used, str(path), dict(report.skipped), report.errors[:50])


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class Question:
    """What the heatmaps need of one evaluated question."""

    sample_id: str
    kind: str
    question: str
    answer: str
    frames: np.ndarray
    token_scores: np.ndarray
    frame_scores: np.ndarray
    kept: list[int]
    oracle: list[int] | None
    answers: dict[str, str]


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def evaluate_runs(
    runs: Sequence[RunInfo],
    data: EvalSet,
    *,
    retentions: Sequence[float] = RETENTIONS,
    baselines: Sequence[str] = BASELINES,
    max_samples: int = 0,
    device: str = "",
    heatmap_questions: int = HEATMAP_QUESTIONS,
    progress: bool = True,
) -> tuple[dict[str, Any], list[Question]]:
    """Per-question rewards of every (seed, method, retention), plus heatmap material for the first seed."""
    from cacovid_rl.baselines import ORACLE, SelectionContext
    from cacovid_rl.data.prompts import build_prompt
    from cacovid_rl.data.video import VideoDecodeError, read_frames
    from cacovid_rl.eval.evaluate import answer_compressed, check_methods, compress_all
    from cacovid_rl.models.loading import load_adapter
    from cacovid_rl.policy.network import CacovidPolicy
    from cacovid_rl.policy.selection import select_tokens
    from cacovid_rl.rl.rewards import compute_reward

    cfg = runs[0].cfg
    check_methods(list(baselines))
    if not (device or cfg.model.device).startswith("cuda"):
        torch.set_num_threads(max(1, cfg.cluster.torch_threads))  # 6x faster than 2 threads on a shared CPU
    model_cfg = dataclasses.replace(cfg.model, device=device) if device else cfg.model
    adapter = load_adapter(model_cfg)
    policies = []
    for run in runs:
        if not (run.policy_dir / "policy_config.json").is_file():
            raise FileNotFoundError(f"run '{run.path}' has no trained policy in {run.policy_dir}")
        policies.append(CacovidPolicy.from_pretrained(run.policy_dir, device=adapter.device).eval())
    records = data.records[:max_samples] if max_samples else data.records
    has_oracle = any(r.sample_id in data.oracle for r in records)
    shared_methods = [m for m in baselines if m not in SEEDED]
    seeded_methods = ["cacovid"] + [m for m in baselines if m in SEEDED] + ([ORACLE] if has_oracle else [])
    rows: list[dict[str, Any]] = []
    heat: list[Question] = []
    want_kinds = _heatmap_plan(records, data, heatmap_questions)
    errors: list[str] = []
    iterator: Any = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="report", unit="q")
    t0 = time.perf_counter()
    for i, rec in enumerate(iterator):
        try:
            frames = read_frames(rec.video, cfg.data.num_frames, cfg.data.max_fps)
        except (ValueError, OSError, VideoDecodeError) as exc:
            errors.append(f"{rec.sample_id}: {exc}")
            continue
        oracle = data.oracle.get(rec.sample_id)
        row: dict[str, Any] = {"sample_id": rec.sample_id, "kind": data.kinds.get(rec.sample_id, "")}
        with torch.no_grad():
            enc = adapter.encode(frames, build_prompt(rec.problem, rec.problem_type))
            full = adapter.generate(enc, None, cfg.model.max_new_tokens)[0]
            fix = cfg.reward.fix_official_bugs
            row["full"] = compute_reward(full, rec.answer, rec.problem_type, fix)
            ctx = SelectionContext(enc=enc, adapter=adapter, oracle_tokens=oracle)
            shared = compress_all(ctx, shared_methods, retentions)
            answers = answer_compressed(
                adapter, enc, {f"{m}@{r}": k for (m, r), k in shared.items()}, cfg.model.max_new_tokens
            )
            for (m, r), k in shared.items():
                row[f"{m}@{r}"] = compute_reward(answers[f"{m}@{r}"], rec.answer, rec.problem_type, fix)
                if oracle:
                    row[f"{KEPT}{m}@{r}"] = _keeps_answer(k, oracle)
            for s, (run, policy) in enumerate(zip(runs, policies, strict=True)):
                scores = policy.score(enc)
                ctx = SelectionContext(
                    enc=enc,
                    adapter=adapter,
                    scores=scores,
                    generator=_generator(run.cfg.seed, i),
                    oracle_tokens=oracle,
                )
                ev = run.cfg.eval
                keeps = compress_all(ctx, seeded_methods, retentions, ev.imp_ratio, ev.max_ratio_scale)
                answers = answer_compressed(
                    adapter, enc, {f"{m}@{r}": k for (m, r), k in keeps.items()}, cfg.model.max_new_tokens
                )
                for (m, r), k in keeps.items():
                    row[f"{m}@{r}@{run.name}"] = compute_reward(answers[f"{m}@{r}"], rec.answer, rec.problem_type, fix)
                    if oracle:
                        row[f"{KEPT}{m}@{r}@{run.name}"] = _keeps_answer(k, oracle)
                if s == 0 and row["kind"] in want_kinds and want_kinds[row["kind"]] > 0:
                    want_kinds[row["kind"]] -= 1
                    kept = select_tokens(
                        scores,
                        TARGET_RETENTION,
                        run.cfg.eval.imp_ratio,
                        max_ratio=run.cfg.eval.max_ratio_scale * TARGET_RETENTION,
                    )
                    heat.append(
                        Question(
                            sample_id=rec.sample_id,
                            kind=row["kind"],
                            question=rec.problem.split("\n")[0],
                            answer=rec.answer,
                            frames=frames,
                            token_scores=scores.token.float().cpu().numpy(),
                            frame_scores=scores.frame.float().cpu().numpy(),
                            kept=kept.tolist(),
                            oracle=oracle,
                            answers={"full": full.strip(), "cacovid": answers[f"cacovid@{TARGET_RETENTION}"].strip()}
                            if ("cacovid", TARGET_RETENTION) in keeps
                            else {"full": full.strip()},
                        )
                    )
        rows.append(row)
    meta = {
        "n": len(rows),
        "skipped_videos": len(errors),
        "errors": errors[:50],
        "seconds": time.perf_counter() - t0,
        "shared_methods": shared_methods,
        "seeded_methods": seeded_methods,
        "device": str(adapter.device),
    }
    return {"rows": rows, "meta": meta}, heat


def _keeps_answer(kept: Any, oracle: list[int]) -> float:
    """1.0 when a compressed block keeps (or merges into an output token) at least one of the answer's tokens.

    ``kept`` is a ``CompressedVideo`` or, for a selection, its kept indices."""
    idx = kept.covered() if hasattr(kept, "covered") else kept
    return float(bool(set(idx.reshape(-1).tolist()) & set(oracle)))


def _heatmap_plan(records: Sequence[QARecord], data: EvalSet, n: int) -> dict[str, int]:
    """How many heatmap questions to take of each kind: spread over the kinds present, most common first."""
    counts: dict[str, int] = {}
    for r in records:
        k = data.kinds.get(r.sample_id, "")
        counts[k] = counts.get(k, 0) + 1
    kinds = sorted(counts, key=lambda k: -counts[k])
    plan = dict.fromkeys(kinds, 0)
    for j in range(n):
        if kinds:
            plan[kinds[j % len(kinds)]] += 1
    return plan


# ----------------------------------------------------------------------------------------------------------------------
# aggregation


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

    def acc(subset: list[dict[str, Any]], key_of) -> list[float]:
        out = []
        for name in names:
            vals = [row[key_of(name)] for row in subset if key_of(name) in row]
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
                vals = acc(subset, lambda n, m=m, ret=ret: prefix + (f"{m}@{ret}@{n}" if m in SEEDED else f"{m}@{ret}"))
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
    """Issue 7's target at ``retention``: CaCoVID >= 95% of full tokens, and a clear margin over every baseline.

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


# ----------------------------------------------------------------------------------------------------------------------
# training curves


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((r["step"], r[key]) for r in rows if key in r and isinstance(r.get(key), (int, float)))
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)


def _smooth(v: np.ndarray, window: int) -> np.ndarray:
    if v.size == 0 or window <= 1:
        return v
    w = min(window, v.size)
    kernel = np.ones(w) / w
    padded = np.concatenate([np.full(w - 1, v[0]), v])
    return np.convolve(padded, kernel, mode="valid")


def training_summary(runs: Sequence[RunInfo]) -> dict[str, Any]:
    """First/last-quarter means of the main training metrics per seed (what the curves show, in numbers)."""
    keys = ("reward/token_mean", "reward/frame_mean", "reward/content_mean", "rollout/rate_mean", "loss/total")
    out: dict[str, Any] = {}
    for run in runs:
        rows = read_metrics(run.metrics_path)
        per: dict[str, Any] = {"updates": int(max((r.get("step", 0) for r in rows), default=0))}
        for k in keys:
            _, v = _series(rows, k)
            if v.size >= 4:
                q = max(1, v.size // 4)
                per[k] = {"first_quarter": float(v[:q].mean()), "last_quarter": float(v[-q:].mean())}
        evals = {k: _series(rows, k) for k in {k for r in rows for k in r if k.startswith("eval/")}}
        per["eval"] = {k: [[float(s), float(x)] for s, x in zip(*sv, strict=True)] for k, sv in sorted(evals.items())}
        out[run.name] = per
    return out


# ----------------------------------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(acc: dict[str, Any], retentions: Sequence[float], path: Path, title: str) -> Path:
    plt = _plt()
    from matplotlib.ticker import NullLocator

    table = acc["all"]
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    xs = [r * 100 for r in retentions]
    for m, per in table.items():
        if m in ("n", "full"):
            continue
        means = [per[str(r)]["mean"] * 100 if str(r) in per else np.nan for r in retentions]
        stds = [per[str(r)]["std"] * 100 if str(r) in per else np.nan for r in retentions]
        style = {"linestyle": ":", "marker": "s"} if m == "oracle" else {"marker": "o"}
        lw = 2.5 if m == "cacovid" else 1.3
        ax.errorbar(xs, means, yerr=stds, label=m, color=COLOURS.get(m), lw=lw, capsize=3, **style)
    ax.axhline(table["full"]["mean"] * 100, color="black", linestyle="--", lw=1, label="full tokens")
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("retention (% of video tokens kept)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    # Outside the axes: with a dozen methods any inside placement covers some of their points.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training(runs: Sequence[RunInfo], path: Path) -> Path | None:
    """2x2 panels: rewards per sample mode, eval accuracy (if logged), keep rate, loss; thin per seed, bold mean."""
    plt = _plt()
    all_rows = {run.name: read_metrics(run.metrics_path) for run in runs}
    if not any(all_rows.values()):
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (
            axes[0, 0],
            "reward (training samples)",
            [("reward/token_mean", "token"), ("reward/frame_mean", "frame"), ("reward/content_mean", "content")],
        ),
        (axes[0, 1], "held-out accuracy (periodic eval)", []),
        (axes[1, 0], "keep rate (adaptive, per question)", [("rollout/rate_mean", "rate")]),
        (axes[1, 1], "loss", [("loss/total", "total"), ("loss/token", "token"), ("loss/frame", "frame")]),
    ]
    colours = ["tab:red", "tab:blue", "tab:green"]
    for ax, title, keys in panels:
        for c, (key, label) in enumerate(keys):
            curves = []
            for rows in all_rows.values():
                s, v = _series(rows, key)
                if v.size:
                    window = max(1, v.size // 20)
                    ax.plot(s, _smooth(v, window), color=colours[c % 3], alpha=0.25, lw=0.8)
                    curves.append((s, _smooth(v, window)))
            if curves:
                n = min(len(s) for s, _ in curves)
                mean = np.mean([v[:n] for _, v in curves], axis=0)
                ax.plot(curves[0][0][:n], mean, color=colours[c % 3], lw=2, label=f"{label} (mean of {len(curves)})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("policy update")
        ax.grid(alpha=0.3)
    ax = axes[0, 1]
    eval_keys = sorted({k for rows in all_rows.values() for r in rows for k in r if k.startswith("eval/") and "@" in k})
    shown = [k for k in eval_keys if k.startswith("eval/cacovid@")] + [
        k for k in eval_keys if not k.startswith("eval/cacovid@") and k.endswith(f"@{TARGET_RETENTION}")
    ]
    for j, key in enumerate(shown[:8]):
        for i, rows in enumerate(all_rows.values()):
            s, v = _series(rows, key)
            if v.size:
                ax.plot(
                    s,
                    v * 100,
                    marker="o",
                    ms=3,
                    lw=1.5 if "cacovid" in key else 0.8,
                    color=COLOURS.get(key.split("/")[1].split("@")[0], f"C{j}"),
                    label=key.removeprefix("eval/") if i == 0 else None,
                )
    for i, rows in enumerate(all_rows.values()):
        s, v = _series(rows, "eval/full")
        if v.size:
            ax.plot(s, v * 100, "k--", lw=0.8, label="full" if i == 0 else None)
    ax.set_ylabel("accuracy (%)")
    if not shown:
        ax.text(
            0.5,
            0.5,
            "no periodic evaluation logged\n(eval.every_steps = 0)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="grey",
        )
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right" if ax is axes[0, 1] else "best")
    fig.suptitle(f"training curves ({len(runs)} seed(s); thin: per seed, bold: mean)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def grid_shape(n: int, height: int, width: int) -> tuple[int, int]:
    """Token grid ``(h, w)`` with ``h * w = n`` closest to the frame's aspect ratio."""
    best = (1, n)
    for h in range(1, n + 1):
        if n % h == 0:
            w = n // h
            if abs(math.log((w / h) / (width / height))) < abs(math.log((best[1] / best[0]) / (width / height))):
                best = (h, w)
    return best


def plot_heatmap(q: Question, path: Path, retention: float = TARGET_RETENTION) -> Path:
    """Frames (top row) and the same frames with the policy's keep probabilities overlaid (bottom row).

    Kept tokens (CaCoVID at ``retention``) are outlined in lime; oracle tokens are marked with a white dashed
    box. Each bottom panel's title shows the frame score and how many tokens the frame keeps.
    """
    plt = _plt()
    from matplotlib.patches import Rectangle

    t, n = q.token_scores.shape
    raw = q.frames
    shown = np.unique(np.linspace(0, t - 1, min(t, MAX_HEATMAP_FRAMES)).round().astype(int))
    h, w = grid_shape(n, raw.shape[1], raw.shape[2])
    prob = 1.0 / (1.0 + np.exp(-q.token_scores))
    kept = set(q.kept)
    oracle = set(q.oracle or [])
    fig, axes = plt.subplots(2, len(shown), figsize=(1.9 * len(shown) + 0.8, 4.6), squeeze=False)
    vmin, vmax = float(prob.min()), float(prob.max())
    im = None
    for col, ti in enumerate(shown):
        frame = raw[min(raw.shape[0] - 1, round(ti * raw.shape[0] / t))]
        for row in (0, 1):
            ax = axes[row, col]
            ax.imshow(frame, extent=(0, w, h, 0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        ax = axes[1, col]
        im = ax.imshow(
            prob[ti].reshape(h, w),
            extent=(0, w, h, 0),
            cmap="magma",
            alpha=0.6,
            vmin=vmin,
            vmax=vmax,
            interpolation="nearest",
        )
        n_kept = 0
        for j in range(n):
            flat = ti * n + j
            y, x = divmod(j, w)
            if flat in oracle:
                ax.add_patch(Rectangle((x + 0.08, y + 0.08), 0.84, 0.84, fill=False, ec="white", lw=1.2, ls="--"))
            if flat in kept:
                n_kept += 1
                ax.add_patch(Rectangle((x + 0.02, y + 0.02), 0.96, 0.96, fill=False, ec="lime", lw=2.2))
        axes[0, col].set_title(f"frame {ti}", fontsize=8)
        ax.set_title(f"s={q.frame_scores[ti]:+.2f} keep {n_kept}", fontsize=7)
    answers = ", ".join(f"{k}: {v!r}" for k, v in q.answers.items())
    fig.suptitle(
        f"[{q.kind}] {q.question}   (answer {q.answer}; {answers})\n"
        f"top: frames; bottom: policy keep probability, lime = kept at {retention:.0%}"
        + (", white dashed = oracle tokens" if q.oracle is not None else ""),
        fontsize=8,
    )
    if im is not None:
        fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01, label="sigmoid(token score)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# markdown


def _cell(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    return f"{v['mean'] * 100:.1f} ± {v['std'] * 100:.1f}"


def _method_order(table: dict[str, Any]) -> list[str]:
    order = ["oracle", "cacovid", *BASELINES]
    return [m for m in order if m in table] + [m for m in table if m not in order and m not in ("n", "full")]


def markdown(report: dict[str, Any], images: dict[str, str]) -> str:
    acc, rets, tgt = report["accuracy"], report["retentions"], report["target"]
    seeds = report["runs"]
    lines = [
        "# CaCoVID evaluation report",
        "",
        f"- runs: {len(seeds)} seed(s): " + ", ".join(f"`{r['name']}` (seed {r['seed']})" for r in seeds),
        f"- evaluation data: `{report['data']['path']}` ({report['data']['layout']} layout), "
        f"{report['eval']['n']} questions, {report['eval']['skipped_videos']} unreadable videos skipped",
        f"- model: `{report['model']}`, {report['num_frames']} frames; policy selection imp_ratio "
        f"{report['imp_ratio']}",
        "- accuracy in %, mean ± sample std over seeds; deterministic baselines (all but random) do not depend "
        "on the seed (std 0); random and the oracle padding draw per seed",
        "",
        "## Accuracy vs retention",
        "",
        "| method | " + " | ".join(f"{r:.0%}" for r in rets) + " |",
        "|---|" + "---:|" * len(rets),
        "| full tokens | " + " | ".join([_cell(acc["all"]["full"])] * len(rets)) + " |",
    ]
    table = acc["all"]
    for m in _method_order(table):
        name = f"**{m}**" if m == "cacovid" else m
        if m == "oracle":
            name = "oracle (answer tokens + random)"
        lines.append(f"| {name} | " + " | ".join(_cell(table[m].get(str(r))) for r in rets) + " |")
    if "cacovid" in table:
        full = table["full"]["mean"]
        rel = [
            table["cacovid"][str(r)]["mean"] / full * 100 if str(r) in table["cacovid"] and full else np.nan
            for r in rets
        ]
        lines.append("| cacovid / full (%) | " + " | ".join(f"{v:.0f}" for v in rel) + " |")
    lines += ["", f"![accuracy vs retention]({images['accuracy']})", ""]
    kept = report.get("answer_kept") or {}
    if kept.get("n"):
        lines += [
            "## How often the answer's tokens are kept",
            "",
            f"Share of the {kept['n']} questions with known answer tokens (`meta.oracle_tokens`) whose selection "
            "keeps at least one of them, in %: where accuracy comes from finding the answer, and where from "
            "the LLM's guesses.",
            "",
            "| method | " + " | ".join(f"{r:.0%}" for r in rets) + " |",
            "|---|" + "---:|" * len(rets),
        ]
        for m in _method_order(kept):
            if m != "oracle":
                lines.append(f"| {m} | " + " | ".join(_cell(kept[m].get(str(r))) for r in rets) + " |")
        lines.append("")
    kinds = [k for k in acc if k != "all"]
    if len(kinds) > 1:
        key = str(TARGET_RETENTION)
        lines += [f"## Per question kind at {TARGET_RETENTION:.0%} retention", ""]
        lines.append("| method | " + " | ".join(f"{k} (n={acc[k]['n']})" for k in kinds) + " |")
        lines.append("|---|" + "---:|" * len(kinds))
        lines.append("| full tokens | " + " | ".join(_cell(acc[k]["full"]) for k in kinds) + " |")
        for m in _method_order(table):
            lines.append(f"| {m} | " + " | ".join(_cell(acc[k].get(m, {}).get(key)) for k in kinds) + " |")
        lines.append("")
    lines += ["## Target (issue 7)", ""]
    if tgt.get("evaluated"):
        verdict = "**met**" if tgt["met"] else "**not met**"
        lines += [
            f"At {tgt['retention']:.0%} retention CaCoVID keeps {tgt['fraction_of_full'] * 100:.1f}% of full-token "
            f"accuracy (target ≥ {TARGET_FRACTION:.0%}: {'yes' if tgt['fraction_met'] else 'no'}); best non-oracle "
            f"baseline: {tgt['best_baseline']}, margin {tgt['margin_over_best'] * 100:+.1f} points; seed ranges "
            f"separated from every baseline: {'yes' if all(tgt['separated'].values()) else 'no'} "
            f"({', '.join(f'{m}: {s}' for m, s in tgt['separated'].items())}). Target {verdict}.",
            "",
        ]
    else:
        lines += ["No CaCoVID result at the target retention.", ""]
    if images.get("training"):
        lines += ["## Training", "", f"![training curves]({images['training']})", ""]
        lines.append("| seed | updates | token reward (first → last quarter) | frame reward | rate |")
        lines.append("|---|---:|---|---|---|")
        for name, per in report["training"].items():

            def fl(k, per=per):
                v = per.get(k)
                return f"{v['first_quarter']:.3f} → {v['last_quarter']:.3f}" if v else "-"

            lines.append(
                f"| {name} | {per['updates']} | {fl('reward/token_mean')} | {fl('reward/frame_mean')} | "
                f"{fl('rollout/rate_mean')} |"
            )
        lines.append("")
    if images.get("heatmaps"):
        lines += [
            "## What the policy keeps",
            "",
            f"Test questions of the first seed. Top row: the frames; bottom row: the policy's keep probability "
            f"per token, tokens kept at {TARGET_RETENTION:.0%} retention outlined in lime, the answer's (oracle) "
            "tokens dashed white; panel titles give the frame score and the tokens kept in that frame.",
            "",
        ]
        lines += [f"![heatmap]({p})" for p in images["heatmaps"]]
        lines.append("")
    lines += ["## Reproduce", "", "```", report["command"], "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# entry point


def _compact(v: Any) -> Any:
    """Rewards as ints when whole (most are 0/1), else rounded floats; None stays None."""
    if v is None:
        return None
    return int(v) if float(v).is_integer() else round(float(v), 4)


def _arg(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value in (None, "", []) else value


def main(args: argparse.Namespace) -> int:
    """Build the report for ``args.run`` into ``args.out`` (default ``<run>/report``); returns an exit code.

    Optional attributes (``python -m cacovid_rl.eval.report --help``): ``data``, ``video_root``, ``layout``,
    ``retentions``, ``max_samples``, ``device``, ``config`` (fallback when a run has no resolved config),
    ``heatmaps``.
    """
    run_root = Path(args.run)
    out = Path(_arg(args, "out", run_root / "report"))
    try:
        runs = load_runs(run_root, _arg(args, "config", None))
    except (FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = runs[0].cfg
    data_path = _arg(args, "data", cfg.data.eval_path)
    if not data_path:
        print("error: no evaluation data: the run config has no data.eval_path; pass --data", file=sys.stderr)
        return 2
    video_root = _arg(args, "video_root", cfg.data.video_root if data_path == cfg.data.eval_path else None)
    retentions = tuple(float(r) for r in _arg(args, "retentions", RETENTIONS))
    from cacovid_rl.eval.benchmarks import BenchmarkError

    try:
        data = load_eval_set(data_path, video_root, _arg(args, "layout", "auto"))
    except (BenchmarkError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not data.records:
        print(f"error: no usable records in {data_path}: {data.skipped} ({data.errors[:3]})", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    baselines = tuple(_arg(args, "baselines", BASELINES))
    result, heat = evaluate_runs(
        runs,
        data,
        retentions=retentions,
        baselines=baselines,
        max_samples=int(_arg(args, "max_samples", 0)),
        device=_arg(args, "device", ""),
        heatmap_questions=int(_arg(args, "heatmaps", HEATMAP_QUESTIONS)),
        progress=not getattr(args, "quiet", False),
    )
    methods = [*result["meta"]["seeded_methods"], *result["meta"]["shared_methods"]]
    acc = aggregate(result["rows"], runs, retentions, methods)
    command = f"cacovid-rl report --run {run_root}" + (f" --out {args.out}" if getattr(args, "out", "") else "")
    report: dict[str, Any] = {
        "runs": [{"name": r.name, "path": str(r.path), "seed": r.cfg.seed, "config": r.config_source} for r in runs],
        "data": {"path": str(data_path), "layout": data.layout, "skipped": data.skipped, "errors": data.errors[:20]},
        "model": cfg.model.path,
        "num_frames": cfg.data.num_frames,
        "imp_ratio": cfg.eval.imp_ratio,
        "retentions": list(retentions),
        "eval": result["meta"],
        "accuracy": acc,
        "target": target_check(acc),
        "answer_kept": aggregate(result["rows"], runs, retentions, methods, prefix=KEPT)["all"],
        "training": training_summary(runs),
        "command": command,
    }
    images: dict[str, Any] = {"accuracy": "accuracy_vs_retention.png"}
    title = (
        f"accuracy vs retention, model {cfg.model.path} ({len(runs)} seed(s), n={result['meta']['n']}, "
        f"{Path(data_path).name})"
    )
    plot_accuracy(acc, retentions, out / images["accuracy"], title)
    if plot_training(runs, out / "training_curves.png") is not None:
        images["training"] = "training_curves.png"
    images["heatmaps"] = []
    for i, q in enumerate(heat):
        name = f"heatmap_{i}.png"
        plot_heatmap(q, out / name)
        images["heatmaps"].append(name)
    report["images"] = images
    report["per_question"] = "per_question.json"
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    columns = sorted({k for row in result["rows"] for k in row} - {"sample_id", "kind"})
    table = {
        "columns": ["sample_id", "kind", *columns],
        "rows": [[row["sample_id"], row["kind"], *[_compact(row.get(c)) for c in columns]] for row in result["rows"]],
    }
    (out / "per_question.json").write_text(json.dumps(table, separators=(",", ":")) + "\n")
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
    p.add_argument("--retentions", type=float, nargs="+", default=None, help="retention ratios (default 5/10/25/50%%)")
    p.add_argument("--max-samples", dest="max_samples", type=int, default=0, help="evaluate at most N questions")
    p.add_argument("--device", default="", help="override model.device (e.g. cuda)")
    p.add_argument("--config", default="", help="YAML config for runs without a resolved config")
    p.add_argument(
        "--baselines",
        nargs="+",
        default=None,
        help=f"compression methods of cacovid_rl.baselines.METHODS (default: {' '.join(BASELINES)})",
    )
    p.add_argument("--heatmaps", type=int, default=HEATMAP_QUESTIONS, help="number of heatmap questions")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(build_parser().parse_args()))
