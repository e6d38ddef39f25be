"""Document hooks of the ``cacovid_synthetic`` lmms-eval task: the project's own prompt and reward.

The prompt (``build_prompt``) and the score (``compute_reward``) are the functions the project's evaluation
(``cacovid_rl.eval.evaluate``) uses, so the accuracy lmms-eval prints can be compared with the project's number
for the same questions, answer for answer.
"""

from __future__ import annotations

from typing import Any

from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.rl.rewards import compute_reward


def doc_to_visual(doc: dict[str, Any]) -> list[str]:
    """The question's video: one absolute file path (the model decodes and samples it)."""
    return [doc["video"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The question with its problem type's bare-answer instruction, exactly as in training and evaluation."""
    return build_prompt(doc["problem"], doc["problem_type"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The project's reward of the answer (1.0 / 0.0 for multiple choice and counts): its mean is the accuracy."""
    return {"accuracy": compute_reward(results[0], doc["answer"], doc["problem_type"])}
