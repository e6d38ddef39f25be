"""Accuracy at given retention ratios for the policy and the training-free baselines.

Each video is decoded and encoded once; every (method, retention) pair then only costs one pruned
LLM answer. Bad records (corrupt video, missing file) are skipped and counted, never fatal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cacovid_rl.baselines.base import SelectionContext, get_selector
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import QARecord
from cacovid_rl.data.video import VideoDecodeError, read_frames
from cacovid_rl.rl.rewards import compute_reward


def evaluate(
    adapter,
    policy,
    records: list[QARecord],
    retentions: tuple[float, ...] | list[float],
    methods: tuple[str, ...] | list[str],
    *,
    num_frames: int,
    max_fps: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    imp_ratio: float = 0.5,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean reward (accuracy for multiple choice) of each method at each retention, plus full tokens."""
    methods = list(methods)
    if policy is not None and "cacovid" not in methods:
        methods = ["cacovid", *methods]
    sums: dict[str, dict[str, float]] = {m: {str(r): 0.0 for r in retentions} for m in methods}
    full = 0.0
    n = skipped = 0
    errors: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="eval", unit="q")
    for rec in iterator:
        try:
            frames = read_frames(rec.video, num_frames, max_fps)
        except (ValueError, OSError, VideoDecodeError) as exc:
            skipped += 1
            errors.append(f"{rec.sample_id}: {exc}")
            continue
        with torch.no_grad():
            enc = adapter.encode(frames, build_prompt(rec.problem, rec.problem_type))
            scores = policy.score(enc) if policy is not None else None
            ctx = SelectionContext(enc=enc, adapter=adapter, scores=scores, generator=gen)
            full += compute_reward(adapter.generate(enc, None, max_new_tokens)[0], rec.answer, rec.problem_type)
            for m in methods:
                selector = get_selector(m, imp_ratio=imp_ratio) if m == "cacovid" else get_selector(m)
                for r in retentions:
                    keep = selector.select(ctx, r).to(enc.inputs_embeds.device)
                    answer = adapter.generate(enc, keep[None], max_new_tokens)[0]
                    sums[m][str(r)] += compute_reward(answer, rec.answer, rec.problem_type)
        n += 1
    denom = max(1, n)
    return {
        "n": n,
        "skipped": skipped,
        "errors": errors[:50],
        "retentions": [float(r) for r in retentions],
        "full": full / denom,
        "methods": {m: {k: v / denom for k, v in per.items()} for m, per in sums.items()},
    }


def flatten_eval(result: dict[str, Any]) -> tuple[dict[str, float], list[list[Any]]]:
    """wandb-style flat metrics (``eval/<method>@<r>``) and table rows."""
    flat = {"eval/full": float(result["full"]), "eval/n": float(result["n"]), "eval/skipped": float(result["skipped"])}
    rows: list[list[Any]] = [["full", 1.0, float(result["full"])]]
    for m, per in result["methods"].items():
        for r, acc in per.items():
            flat[f"eval/{m}@{r}"] = float(acc)
            rows.append([m, float(r), float(acc)])
    return flat, rows


def plot_accuracy(result: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Accuracy vs retention per method, with the full-token accuracy as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, per in result["methods"].items():
        rs = sorted(per, key=float)
        ax.plot([float(r) * 100 for r in rs], [per[r] * 100 for r in rs], marker="o", label=m)
    ax.axhline(result["full"] * 100, color="black", linestyle="--", label="full tokens")
    ax.set_xlabel("retention (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or f"accuracy vs retention (n={result['n']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_eval_outputs(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path, dict[str, float], list]:
    """Write ``eval_v<version>.json`` and its PNG plot; returns (json, png, flat metrics, rows)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"v{int(result.get('version', 0)):06d}"
    json_path = out_dir / f"eval_{tag}.json"
    json_path.write_text(json.dumps(result, indent=2))
    png_path = plot_accuracy(result, out_dir / f"eval_{tag}.png", title=f"policy version {result.get('version', 0)}")
    flat, rows = flatten_eval(result)
    return json_path, png_path, flat, rows


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())
