"""The report's evaluation: every seed's policy and the baselines on the evaluation set, through the one
evaluation loop (``evaluate.answer_questions``), as one row of rewards per question plus heatmap material.

The deterministic baselines are one arm, answered once and shared by all seeds; the seeded methods
(:data:`aggregate.SEEDED`: the policy, ``random``, the oracle's padding) are one arm per seed, each with its own
generator per question. For a merging method, "kept an answer token" counts the tokens merged into its output too
(``CompressedVideo.covered``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cacovid_rl.config import EvalConfig
from cacovid_rl.data.records import QARecord
from cacovid_rl.eval.aggregate import KEPT, SEEDED, TARGET_RETENTION, row_key
from cacovid_rl.eval.evaluate import AnsweredQuestion, AnswerSettings, Arm, SkippedQuestion, answer_questions
from cacovid_rl.eval.plots import Question
from cacovid_rl.eval.runs import RunInfo

HEATMAP_QUESTIONS = 4
SHARED = ""
"""The arm of the methods that do not depend on the seed (its row keys carry no run name)."""


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


def _generator(seed: int, index: int) -> torch.Generator:
    """The random draws of one seed on one question: independent of which other questions were evaluated."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def _seed_generator(seed: int):
    return lambda index: _generator(seed, index)


def _arms(
    runs: Sequence[RunInfo], policies: Sequence[Any], baselines: Sequence[str], has_oracle: bool
) -> tuple[list[Arm], list[str], list[str]]:
    """The shared arm and one arm per seed; also the shared and the seeded method names."""
    from cacovid_rl.baselines import ORACLE

    shared = [m for m in baselines if m not in SEEDED]
    seeded = ["cacovid"] + [m for m in baselines if m in SEEDED] + ([ORACLE] if has_oracle else [])
    arms = [Arm(SHARED, tuple(shared))]
    for run, policy in zip(runs, policies, strict=True):
        ev = run.cfg.eval
        arms.append(
            Arm(run.name, tuple(seeded), policy, _seed_generator(run.cfg.seed), ev.imp_ratio, ev.max_ratio_scale)
        )
    return arms, shared, seeded


def _load_models(runs: Sequence[RunInfo], device: str):
    """The model adapter (``device`` overrides ``model.device``) and every run's trained policy on it."""
    from cacovid_rl.models.loading import load_adapter
    from cacovid_rl.policy.network import CacovidPolicy

    cfg = runs[0].cfg
    if not (device or cfg.model.device).startswith("cuda"):
        torch.set_num_threads(max(1, cfg.cluster.torch_threads))  # 6x faster than 2 threads on a shared CPU
    adapter = load_adapter(dataclasses.replace(cfg.model, device=device) if device else cfg.model)
    policies = []
    for run in runs:
        if not (run.policy_dir / "policy_config.json").is_file():
            raise FileNotFoundError(f"run '{run.path}' has no trained policy in {run.policy_dir}")
        policies.append(CacovidPolicy.from_pretrained(run.policy_dir, device=adapter.device).eval())
    return adapter, policies


def evaluate_runs(
    runs: Sequence[RunInfo],
    data: EvalSet,
    *,
    retentions: Sequence[float] = EvalConfig().retentions,
    baselines: Sequence[str] = EvalConfig().baselines,
    max_samples: int = 0,
    device: str = "",
    heatmap_questions: int = HEATMAP_QUESTIONS,
    progress: bool = True,
) -> tuple[dict[str, Any], list[Question]]:
    """Per-question rewards of every (seed, method, retention), plus heatmap material for the first seed."""
    from cacovid_rl.data.video import VideoDecodeError
    from cacovid_rl.eval.evaluate import check_methods

    check_methods(list(baselines))
    adapter, policies = _load_models(runs, device)
    records = data.records[:max_samples] if max_samples else data.records
    has_oracle = any(r.sample_id in data.oracle for r in records)
    arms, shared, seeded = _arms(runs, policies, baselines, has_oracle)
    want_kinds = _heatmap_plan(records, data, heatmap_questions)
    rows: list[dict[str, Any]] = []
    heat: list[Question] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    answered = answer_questions(
        adapter,
        records,
        arms,
        retentions,
        AnswerSettings.from_config(runs[0].cfg),
        oracle=data.oracle,
        # An unreadable video is skipped and counted; an error while answering is a bug and stops the report.
        read_skip=(ValueError, OSError, VideoDecodeError),
        skip=(),
        progress="report" if progress else "",
    )
    for q in answered:
        if isinstance(q, SkippedQuestion):
            errors.append(f"{q.record.sample_id}: {q.error}")
            continue
        row = _row(q, data)
        rows.append(row)
        if want_kinds.get(row["kind"], 0) > 0:
            want_kinds[row["kind"]] -= 1
            heat.append(_heat_question(q, runs[0], row["kind"], data.oracle.get(q.record.sample_id)))
    meta = {
        "n": len(rows),
        "skipped_videos": len(errors),
        "errors": errors[:50],
        "seconds": time.perf_counter() - t0,
        "shared_methods": shared,
        "seeded_methods": seeded,
        "device": str(adapter.device),
    }
    return {"rows": rows, "meta": meta}, heat


def _row(q: AnsweredQuestion, data: EvalSet) -> dict[str, Any]:
    """One question's rewards (and, where its answer tokens are known, whether each selection kept one)."""
    oracle = data.oracle.get(q.record.sample_id)
    row: dict[str, Any] = {
        "sample_id": q.record.sample_id,
        "kind": data.kinds.get(q.record.sample_id, ""),
        "full": q.full_reward,
    }
    for arm, res in q.arms.items():
        for (m, r), reward in res.rewards.items():
            key = row_key(m, r, arm)
            row[key] = reward
            if oracle:
                row[KEPT + key] = _keeps_answer(res.blocks[(m, r)], oracle)
    return row


def _heat_question(q: AnsweredQuestion, run: RunInfo, kind: str, oracle: list[int] | None) -> Question:
    """The first seed's view of one question: its scores, its selection at the target retention, its answers."""
    from cacovid_rl.policy.selection import select_tokens

    res = q.arms[run.name]
    ev = run.cfg.eval
    kept = select_tokens(res.scores, TARGET_RETENTION, ev.imp_ratio, max_ratio=ev.max_ratio_scale * TARGET_RETENTION)
    answers = {"full": q.full_answer.strip()}
    if ("cacovid", TARGET_RETENTION) in res.answers:
        answers["cacovid"] = res.answers[("cacovid", TARGET_RETENTION)].strip()
    return Question(
        sample_id=q.record.sample_id,
        kind=kind,
        question=q.record.problem.split("\n")[0],
        answer=q.record.answer,
        frames=q.frames,
        token_scores=res.scores.token.float().cpu().numpy(),
        frame_scores=res.scores.frame.float().cpu().numpy(),
        kept=kept.tolist(),
        oracle=oracle,
        answers=answers,
    )


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
