"""Accuracy at given retention ratios for the policy and the training-free baselines.

Each video is decoded and encoded once; every (method, retention) pair then only costs one compressed
LLM answer. Every method (selection or merging, ``cacovid_rl.baselines.METHODS``) goes through the same
compression interface (``baselines.compress``), and all blocks of one size are answered in one batched call.
Bad records (corrupt video, missing file) are skipped and counted, never fatal.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cacovid_rl.baselines import METHODS, ORACLE, CompressedVideo, SelectionContext, compress, get_method
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import QARecord
from cacovid_rl.data.video import read_frames
from cacovid_rl.rl.rewards import compute_reward


def answer_selections(adapter, enc, selections: Mapping[str, torch.Tensor], max_new_tokens: int) -> dict[str, str]:
    """Greedy answers of several selections of one question, one batched ``generate`` per kept-token count.

    ``selections`` maps a name to kept flat indices ``[K]``; selections of equal ``K`` share one LLM call.
    """
    groups: dict[int, list[str]] = {}
    for name, keep in selections.items():
        groups.setdefault(int(keep.numel()), []).append(name)
    answers: dict[str, str] = {}
    device = enc.inputs_embeds.device
    for names in groups.values():
        rows = torch.stack([selections[n].to(device) for n in names])
        for name, text in zip(names, adapter.generate(enc, rows, max_new_tokens), strict=True):
            answers[name] = text
    return answers


class _MemoAttention:
    """The adapter with ``early_layer_attention`` computed once per (question, layer): FastV asks at every retention."""

    def __init__(self, adapter) -> None:
        self._adapter = adapter
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def early_layer_attention(self, enc, layer: int = 2) -> torch.Tensor:
        key = (id(enc), layer)
        if key not in self._cache:
            self._cache[key] = self._adapter.early_layer_attention(enc, layer=layer)
        return self._cache[key]

    def __getattr__(self, name: str):
        return getattr(self._adapter, name)


def check_methods(methods: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the unknown entries of ``methods`` (``eval.baselines`` / ``--baselines``)."""
    unknown = [m for m in methods if m not in (*METHODS, ORACLE)]
    if unknown:
        raise ValueError(f"unknown compression method(s) {unknown}; available: {[*METHODS, ORACLE]}")


def _build(m: str, imp_ratio: float, max_ratio_scale: float):
    if m == "cacovid":
        return get_method(m, imp_ratio=imp_ratio, max_ratio_scale=max_ratio_scale)
    return get_method(m)


def _memo(ctx: SelectionContext) -> SelectionContext:
    if ctx.adapter is not None and not isinstance(ctx.adapter, _MemoAttention):
        ctx = dataclasses.replace(ctx, adapter=_MemoAttention(ctx.adapter))
    return ctx


def compress_all(
    ctx: SelectionContext,
    methods: Sequence[str],
    retentions: tuple[float, ...] | list[float],
    imp_ratio: float = 0.5,
    max_ratio_scale: float = 1.5,
) -> dict[tuple[str, float], CompressedVideo]:
    """The compressed block of every (method, retention); ``oracle`` is skipped when ``ctx.oracle_tokens`` is None."""
    check_methods(methods)
    ctx = _memo(ctx)
    out: dict[tuple[str, float], CompressedVideo] = {}
    for m in methods:
        if m == ORACLE and ctx.oracle_tokens is None:
            continue
        method = _build(m, imp_ratio, max_ratio_scale)
        for r in retentions:
            out[(m, float(r))] = compress(method, ctx, r)
    return out


def select_all(
    ctx: SelectionContext,
    methods: list[str],
    retentions: tuple[float, ...] | list[float],
    imp_ratio: float = 0.5,
    max_ratio_scale: float = 1.5,
) -> dict[tuple[str, float], torch.Tensor]:
    """Kept tokens of every (selection method, retention); ``oracle`` is skipped when ``ctx.oracle_tokens`` is None.

    Merging methods have no kept indices: use ``compress_all`` for them (``ValueError`` here).
    """
    check_methods(methods)
    ctx = _memo(ctx)
    out: dict[tuple[str, float], torch.Tensor] = {}
    for m in methods:
        if m == ORACLE and ctx.oracle_tokens is None:
            continue
        selector = _build(m, imp_ratio, max_ratio_scale)
        if not hasattr(selector, "select"):
            raise ValueError(f"{m} merges tokens and has no kept indices; use compress_all")
        for r in retentions:
            out[(m, float(r))] = selector.select(ctx, r)
    return out


def answer_compressed(adapter, enc, blocks: Mapping[str, CompressedVideo], max_new_tokens: int) -> dict[str, str]:
    """Greedy answers of several compressed blocks of one question, one batched LLM call per block size ``K``.

    A group of selections only goes through ``adapter.generate`` with its kept indices (bit-identical to the
    block path); a group with any merged block goes through ``adapter.generate_compressed``.
    """
    groups: dict[int, list[str]] = {}
    for name, blk in blocks.items():
        groups.setdefault(blk.num_tokens, []).append(name)
    answers: dict[str, str] = {}
    device = enc.inputs_embeds.device
    for names in groups.values():
        if all(blocks[n].kept is not None for n in names):
            rows = torch.stack([blocks[n].kept.to(device) for n in names])
            texts = adapter.generate(enc, rows, max_new_tokens)
        else:
            texts = adapter.generate_compressed(enc, [blocks[n] for n in names], max_new_tokens)
        answers.update(zip(names, texts, strict=True))
    return answers


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
    max_ratio_scale: float = 1.5,
    fix_official_bugs: bool = True,
    progress: bool = False,
    oracle: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Mean reward (accuracy for multiple choice) of each method at each retention, plus full tokens.

    ``oracle`` maps sample ids to the flat indices of their answer tokens (the synthetic records'
    ``meta.oracle_tokens``); when given, the ``oracle`` reference is evaluated on the records it covers
    (``result["counts"]["oracle"]`` of them) and every other method on all records.
    """
    methods = list(methods)
    check_methods(methods)
    if policy is not None and "cacovid" not in methods:
        methods = ["cacovid", *methods]
    if oracle is not None and ORACLE not in methods:
        methods.append(ORACLE)
    sums: dict[str, dict[str, float]] = {m: {str(r): 0.0 for r in retentions} for m in methods}
    counts = dict.fromkeys(methods, 0)
    full = 0.0
    n = skipped = 0
    errors: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="eval", unit="q")
    for rec in iterator:
        # Any failure of one record (a corrupt video, text the tokenizer rejects, ...) skips that record only; its
        # rewards are summed into the totals after it fully succeeded, so a failure halfway adds nothing.
        try:
            frames = read_frames(rec.video, num_frames, max_fps)
            with torch.no_grad():
                enc = adapter.encode(frames, build_prompt(rec.problem, rec.problem_type))
                scores = policy.score(enc) if policy is not None else None
                tokens = None if oracle is None else oracle.get(rec.sample_id)
                ctx = SelectionContext(enc=enc, adapter=adapter, scores=scores, generator=gen, oracle_tokens=tokens)
                rec_full = compute_reward(
                    adapter.generate(enc, None, max_new_tokens)[0], rec.answer, rec.problem_type, fix_official_bugs
                )
                keeps = compress_all(ctx, methods, retentions, imp_ratio, max_ratio_scale)
                answers = answer_compressed(
                    adapter, enc, {f"{m}@{r}": k for (m, r), k in keeps.items()}, max_new_tokens
                )
                rec_rewards = {
                    (m, r): compute_reward(answers[f"{m}@{r}"], rec.answer, rec.problem_type, fix_official_bugs)
                    for (m, r) in keeps
                }
        except Exception as exc:
            skipped += 1
            errors.append(f"{rec.sample_id}: {type(exc).__name__}: {exc}")
            continue
        full += rec_full
        for (m, r), reward in rec_rewards.items():
            sums[m][str(r)] += reward
        for m in {m for m, _ in rec_rewards}:
            counts[m] += 1
        n += 1
    denom = max(1, n)
    return {
        "n": n,
        "skipped": skipped,
        "errors": errors[:50],
        "retentions": [float(r) for r in retentions],
        "full": full / denom,
        "methods": {
            m: {k: v / max(1, counts[m]) for k, v in per.items()} for m, per in sums.items() if counts[m] or m != ORACLE
        },
        "counts": counts,
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
