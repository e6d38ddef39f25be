"""Every plot of the evaluation: accuracy vs retention (the report and each periodic evaluation), the training
curves of a report's runs, and the token heatmaps of single questions (the report, ``cacovid-rl answer`` and the
wandb samples of the periodic evaluation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cacovid_rl.eval.aggregate import TARGET_RETENTION
from cacovid_rl.eval.runs import RunInfo, read_metrics, series

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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(table: dict[str, Any], retentions: Sequence[float], path: Path, title: str) -> Path:
    """Accuracy vs retention: one line per method (mean, error bars the std over seeds), full tokens dashed.

    ``table`` is one accuracy table: ``full`` and per method ``{str(retention): {"mean", "std"}}`` (the report's
    ``accuracy["all"]``, or ``evaluate.accuracy_table`` of one evaluation).
    """
    plt = _plt()
    from matplotlib.ticker import NullLocator

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


def _smooth(v: np.ndarray, window: int) -> np.ndarray:
    if v.size == 0 or window <= 1:
        return v
    w = min(window, v.size)
    kernel = np.ones(w) / w
    padded = np.concatenate([np.full(w - 1, v[0]), v])
    return np.convolve(padded, kernel, mode="valid")


_CURVE_COLOURS = ["tab:red", "tab:blue", "tab:green"]
_PANELS = [
    (
        (0, 0),
        "reward (training samples)",
        [("reward/token_mean", "token"), ("reward/frame_mean", "frame"), ("reward/content_mean", "content")],
    ),
    ((0, 1), "held-out accuracy (periodic eval)", []),
    ((1, 0), "keep rate (adaptive, per question)", [("rollout/rate_mean", "rate")]),
    ((1, 1), "loss", [("loss/total", "total"), ("loss/token", "token"), ("loss/frame", "frame")]),
]


def _plot_curves(ax, all_rows: dict[str, list[dict[str, Any]]], keys: list[tuple[str, str]]) -> None:
    """Each metric smoothed per seed (thin) and the mean over seeds (bold, over the steps all seeds reached)."""
    for c, (key, label) in enumerate(keys):
        colour = _CURVE_COLOURS[c % 3]
        curves = []
        for rows in all_rows.values():
            s, v = series(rows, key)
            if v.size:
                smooth = _smooth(v, max(1, v.size // 20))
                ax.plot(s, smooth, color=colour, alpha=0.25, lw=0.8)
                curves.append((s, smooth))
        if curves:
            n = min(len(s) for s, _ in curves)
            mean = np.mean([v[:n] for _, v in curves], axis=0)
            ax.plot(curves[0][0][:n], mean, color=colour, lw=2, label=f"{label} (mean of {len(curves)})")


def _plot_periodic_eval(ax, all_rows: dict[str, list[dict[str, Any]]]) -> None:
    """The periodic evaluation's accuracies: the policy at every retention and the baselines at the target one."""
    eval_keys = sorted({k for rows in all_rows.values() for r in rows for k in r if k.startswith("eval/") and "@" in k})
    shown = [k for k in eval_keys if k.startswith("eval/cacovid@")] + [
        k for k in eval_keys if not k.startswith("eval/cacovid@") and k.endswith(f"@{TARGET_RETENTION}")
    ]
    for j, key in enumerate(shown[:8]):
        colour = COLOURS.get(key.split("/")[1].split("@")[0], f"C{j}")
        lw = 1.5 if "cacovid" in key else 0.8
        for i, rows in enumerate(all_rows.values()):
            s, v = series(rows, key)
            if v.size:
                label = key.removeprefix("eval/") if i == 0 else None
                ax.plot(s, v * 100, marker="o", ms=3, lw=lw, color=colour, label=label)
    for i, rows in enumerate(all_rows.values()):
        s, v = series(rows, "eval/full")
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


def plot_training(runs: Sequence[RunInfo], path: Path) -> Path | None:
    """2x2 panels: rewards per sample mode, eval accuracy (if logged), keep rate, loss; thin per seed, bold mean."""
    plt = _plt()
    all_rows = {run.name: read_metrics(run.metrics_path) for run in runs}
    if not any(all_rows.values()):
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for (row, col), title, keys in _PANELS:
        ax = axes[row, col]
        _plot_curves(ax, all_rows, keys)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("policy update")
        ax.grid(alpha=0.3)
    _plot_periodic_eval(axes[0, 1], all_rows)
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
