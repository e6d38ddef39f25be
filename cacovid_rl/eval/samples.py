"""A few evaluation questions answered by the policy, with a picture of the tokens it kept: what a user looks at
to see *what* the policy learned, beside the accuracy numbers.

The periodic evaluation task calls :func:`sample_questions` after ``evaluate``; the driver turns the samples into
a wandb table (``learner/monitoring.py::log_samples``). The pictures are drawn here, in the task, because only the
task has the decoded frames; they travel as base64 PNG so the result stays JSON.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cacovid_rl.config import Config
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import QARecord
from cacovid_rl.data.video import read_frames
from cacovid_rl.eval.aggregate import TARGET_RETENTION
from cacovid_rl.policy.selection import select_tokens
from cacovid_rl.rl.rewards import compute_reward

DEFAULT_QUESTIONS = 4


def pick_retention(retentions: Sequence[float]) -> float:
    """The evaluated retention closest to ``TARGET_RETENTION`` (10%: the one the report's heatmaps and target use)."""
    return float(min(retentions, key=lambda r: abs(float(r) - TARGET_RETENTION))) if retentions else TARGET_RETENTION


def sample_questions(
    adapter,
    policy,
    records: Sequence[QARecord],
    cfg: Config,
    n: int = DEFAULT_QUESTIONS,
    retention: float | None = None,
    draw: bool = True,
) -> list[dict[str, Any]]:
    """The policy's answer to the first ``n`` usable ``records`` at ``retention`` (default: :func:`pick_retention` of
    ``cfg.eval.retentions``), selected as the evaluation's ``cacovid`` method selects (``eval.imp_ratio``,
    ``eval.max_ratio_scale``).

    Each sample: ``sample_id``, ``question`` (its first line, as the report shows it), ``answer`` (the model's,
    greedy), ``ground_truth``, ``reward``, ``kept`` (flat indices), ``kept_tokens``, ``total_tokens``, ``retention``
    and, with ``draw``, ``png_b64``: the report's heatmap (``eval/plots.py::plot_heatmap``) of the frames with the
    kept tokens outlined. A record that fails (a bad video) is passed over, never raised: this is decoration.
    """
    if policy is None or n <= 0:
        return []
    r = pick_retention(cfg.eval.retentions) if retention is None else float(retention)
    out: list[dict[str, Any]] = []
    for rec in records:
        if len(out) >= n:
            break
        try:
            out.append(_one(adapter, policy, rec, cfg, r, draw))
        except Exception:  # the evaluation proper counts bad records; the samples just take the next one
            continue
    return out


def _one(adapter, policy, rec: QARecord, cfg: Config, retention: float, draw: bool) -> dict[str, Any]:
    from cacovid_rl.rl.worker import check_prompt_budget

    check_prompt_budget(adapter, rec, cfg.model.max_prompt_tokens)  # a huge prompt would cost minutes or memory
    frames = read_frames(rec.video, cfg.data.num_frames, cfg.data.max_fps)
    with torch.no_grad():
        enc = adapter.encode(frames, build_prompt(rec.problem, rec.problem_type))
        scores = policy.score(enc)
        cap = cfg.eval.max_ratio_scale * retention
        kept = select_tokens(scores, retention, cfg.eval.imp_ratio, max_ratio=cap).to(enc.inputs_embeds.device)
        answer = adapter.generate(enc, kept[None], cfg.model.max_new_tokens)[0]
    reward = compute_reward(answer, rec.answer, rec.problem_type, cfg.reward.fix_official_bugs)
    sample: dict[str, Any] = {
        "sample_id": rec.sample_id,
        "question": rec.problem.split("\n")[0],
        "answer": answer.strip(),
        "ground_truth": rec.answer,
        "reward": float(reward),
        "kept": kept.cpu().tolist(),
        "kept_tokens": int(kept.numel()),
        "total_tokens": int(enc.num_video_tokens),
        "retention": retention,
    }
    if draw:
        sample["png_b64"] = base64.b64encode(_draw(rec, frames, scores, sample, retention)).decode("ascii")
    return sample


def _draw(rec: QARecord, frames, scores, sample: dict[str, Any], retention: float) -> bytes:
    """The report's heatmap of this question as PNG bytes (drawn into a temporary file, which matplotlib needs)."""
    from cacovid_rl.eval.plots import Question, plot_heatmap

    q = Question(
        sample_id=rec.sample_id,
        kind=rec.problem_type,
        question=sample["question"],
        answer=rec.answer,
        frames=frames,
        token_scores=scores.token.float().cpu().numpy(),
        frame_scores=scores.frame.float().cpu().numpy(),
        kept=sample["kept"],
        oracle=None,
        answers={"cacovid": sample["answer"]},
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_heatmap(q, Path(tmp) / "sample.png", retention=retention)
        return path.read_bytes()
