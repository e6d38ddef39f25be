"""Accuracy at given retention ratios for the policy and the training-free baselines: the one evaluation loop.

:func:`answer_questions` is the loop every evaluation runs (``cacovid-rl eval``, the periodic Ray task and
``cacovid-rl report``): each video is decoded and encoded once, answered with full tokens, and then every
(method, retention) pair of every :class:`Arm` only costs one compressed LLM answer. Every method (selection or
merging, ``cacovid_rl.baselines.METHODS``) goes through the same compression interface (``baselines.compress``),
and all blocks of one size are answered in one batched call. A record that fails (corrupt video, missing file) is
skipped and reported, never fatal. :func:`evaluate` turns the loop into the mean reward per method and retention.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cacovid_rl.baselines import METHODS, ORACLE, CompressedVideo, SelectionContext, compress, get_method
from cacovid_rl.config import Config, EvalConfig
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import QARecord
from cacovid_rl.data.video import read_frames
from cacovid_rl.rl.rewards import compute_reward
from cacovid_rl.types import PolicyScores

_EVAL = EvalConfig()  # the selection defaults (imp_ratio, max_ratio_scale) of the config, not copies of them


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
    imp_ratio: float = _EVAL.imp_ratio,
    max_ratio_scale: float = _EVAL.max_ratio_scale,
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
    imp_ratio: float = _EVAL.imp_ratio,
    max_ratio_scale: float = _EVAL.max_ratio_scale,
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


def _no_generator(_index: int) -> torch.Generator | None:
    return None


@dataclass(frozen=True)
class Arm:
    """Methods answered under one setting on every question: the policy scoring for ``cacovid``, the generator of
    the random draws (``random``, the oracle's padding) and the policy selection's quotas.

    ``generator`` maps the question's index to its generator: one shared generator (``cacovid-rl eval``) or one per
    seed and question (the report). The report answers its deterministic baselines in an arm without a policy, once
    for all seeds, and the seeded methods in one arm per seed.
    """

    name: str
    methods: tuple[str, ...]
    policy: Any = None
    generator: Callable[[int], torch.Generator | None] = _no_generator
    imp_ratio: float = _EVAL.imp_ratio
    max_ratio_scale: float = _EVAL.max_ratio_scale


@dataclass(frozen=True)
class AnswerSettings:
    """How every question is read, answered and scored (frames, decoding, reward rules)."""

    num_frames: int
    max_fps: float = 1.0
    max_new_tokens: int = 16
    fix_official_bugs: bool = True

    @classmethod
    def from_config(cls, cfg: Config) -> AnswerSettings:
        d = cfg.data
        return cls(d.num_frames, d.max_fps, cfg.model.max_new_tokens, cfg.reward.fix_official_bugs)


@dataclass
class ArmAnswers:
    """One arm's results on one question, keyed by ``(method, retention)``."""

    scores: PolicyScores | None
    blocks: dict[tuple[str, float], CompressedVideo]
    answers: dict[tuple[str, float], str]
    rewards: dict[tuple[str, float], float]


@dataclass
class AnsweredQuestion:
    """One question answered with full tokens and by every arm."""

    index: int
    record: QARecord
    frames: np.ndarray
    full_answer: str
    full_reward: float
    arms: dict[str, ArmAnswers]


@dataclass
class SkippedQuestion:
    """A question whose reading or answering raised: it counts as skipped and adds nothing to any total."""

    index: int
    record: QARecord
    error: Exception


def answer_questions(
    adapter,
    records: Iterable[QARecord],
    arms: Sequence[Arm],
    retentions: Sequence[float],
    settings: AnswerSettings,
    *,
    oracle: Mapping[str, list[int]] | None = None,
    read_skip: tuple[type[Exception], ...] = (Exception,),
    skip: tuple[type[Exception], ...] = (Exception,),
    progress: str = "",
) -> Iterator[AnsweredQuestion | SkippedQuestion]:
    """Answer every record with full tokens and with every arm's methods at every retention, one record at a time.

    ``oracle`` maps sample ids to their answer tokens (``meta.oracle_tokens``): the ``oracle`` method runs on the
    records it covers. An exception of a type in ``read_skip`` raised while one record's video is read, or in
    ``skip`` while it is encoded and answered, makes that record a :class:`SkippedQuestion`; any other propagates.
    ``progress`` is the progress bar's label (none when empty).
    """
    check_methods([m for arm in arms for m in arm.methods])
    items: Iterable[QARecord] = records
    if progress:
        from tqdm import tqdm

        items = tqdm(records, desc=progress, unit="q")
    for i, rec in enumerate(items):
        tokens = None if oracle is None else oracle.get(rec.sample_id)
        try:
            frames = read_frames(rec.video, settings.num_frames, settings.max_fps)
        except read_skip as exc:
            yield SkippedQuestion(i, rec, exc)
            continue
        try:
            answered = _answer_one(adapter, i, rec, frames, arms, retentions, settings, tokens)
        except skip as exc:
            yield SkippedQuestion(i, rec, exc)
            continue
        yield answered


def _answer_one(
    adapter,
    index: int,
    rec: QARecord,
    frames: np.ndarray,
    arms: Sequence[Arm],
    retentions: Sequence[float],
    settings: AnswerSettings,
    oracle_tokens: list[int] | None,
) -> AnsweredQuestion:
    with torch.no_grad():
        enc = adapter.encode(frames, build_prompt(rec.problem, rec.problem_type))
        full = adapter.generate(enc, None, settings.max_new_tokens)[0]
        per_arm = {
            arm.name: _answer_arm(adapter, enc, index, rec, arm, retentions, settings, oracle_tokens) for arm in arms
        }
    reward = compute_reward(full, rec.answer, rec.problem_type, settings.fix_official_bugs)
    return AnsweredQuestion(index, rec, frames, full, reward, per_arm)


def _answer_arm(
    adapter,
    enc,
    index: int,
    rec: QARecord,
    arm: Arm,
    retentions: Sequence[float],
    settings: AnswerSettings,
    oracle_tokens: list[int] | None,
) -> ArmAnswers:
    scores = arm.policy.score(enc) if arm.policy is not None else None
    ctx = SelectionContext(
        enc=enc, adapter=adapter, scores=scores, generator=arm.generator(index), oracle_tokens=oracle_tokens
    )
    blocks = compress_all(ctx, arm.methods, retentions, arm.imp_ratio, arm.max_ratio_scale)
    texts = answer_compressed(adapter, enc, {f"{m}@{r}": b for (m, r), b in blocks.items()}, settings.max_new_tokens)
    answers = {(m, r): texts[f"{m}@{r}"] for (m, r) in blocks}
    fix = settings.fix_official_bugs
    rewards = {key: compute_reward(text, rec.answer, rec.problem_type, fix) for key, text in answers.items()}
    return ArmAnswers(scores, blocks, answers, rewards)


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
    imp_ratio: float = _EVAL.imp_ratio,
    max_ratio_scale: float = _EVAL.max_ratio_scale,
    fix_official_bugs: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean reward (accuracy for multiple choice) of each method at each retention, plus full tokens.

    The policy, when given, is evaluated as the ``cacovid`` method. The random draws of all questions come from one
    generator seeded with ``seed``. Records carry no answer tokens here, so ``oracle`` (if listed) is left out of
    ``result["methods"]``; the report evaluates it.
    """
    methods = list(methods)
    check_methods(methods)
    if policy is not None and "cacovid" not in methods:
        methods = ["cacovid", *methods]
    gen = torch.Generator().manual_seed(seed)
    arm = Arm("eval", tuple(methods), policy, lambda _index: gen, imp_ratio, max_ratio_scale)
    settings = AnswerSettings(num_frames, max_fps, max_new_tokens, fix_official_bugs)
    answered = answer_questions(adapter, records, [arm], retentions, settings, progress="eval" if progress else "")
    return _mean_rewards(answered, arm.name, methods, retentions)


def _mean_rewards(
    answered: Iterable[AnsweredQuestion | SkippedQuestion],
    arm: str,
    methods: Sequence[str],
    retentions: Sequence[float],
) -> dict[str, Any]:
    """Sum the rewards of the answered questions and count the skipped ones (with their first 50 errors)."""
    sums: dict[str, dict[str, float]] = {m: {str(r): 0.0 for r in retentions} for m in methods}
    counts = dict.fromkeys(methods, 0)
    full = 0.0
    n = skipped = 0
    errors: list[str] = []
    for q in answered:
        if isinstance(q, SkippedQuestion):
            skipped += 1
            errors.append(f"{q.record.sample_id}: {type(q.error).__name__}: {q.error}")
            continue
        full += q.full_reward
        rewards = q.arms[arm].rewards
        for (m, r), reward in rewards.items():
            sums[m][str(r)] += reward
        for m in {m for m, _ in rewards}:
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


def accuracy_table(result: dict[str, Any]) -> dict[str, Any]:
    """An :func:`evaluate` result as one accuracy table of the report (``mean``/``std`` per method and retention;
    one evaluation, so every std is 0), the form :func:`cacovid_rl.eval.plots.plot_accuracy` draws."""
    one = {"std": 0.0}
    table: dict[str, Any] = {"n": result["n"], "full": {"mean": float(result["full"]), **one}}
    for m, per in result["methods"].items():
        table[m] = {r: {"mean": float(acc), **one} for r, acc in per.items()}
    return table


def write_eval_outputs(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path, dict[str, float], list]:
    """Write ``eval_v<version>.json`` and its PNG plot; returns (json, png, flat metrics, rows)."""
    from cacovid_rl.eval.plots import plot_accuracy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    version = result.get("version", 0)
    tag = f"v{int(version):06d}"
    json_path = out_dir / f"eval_{tag}.json"
    json_path.write_text(json.dumps(result, indent=2))
    title = f"policy version {version} (n={result['n']})"
    png_path = plot_accuracy(accuracy_table(result), result["retentions"], out_dir / f"eval_{tag}.png", title)
    flat, rows = flatten_eval(result)
    return json_path, png_path, flat, rows
