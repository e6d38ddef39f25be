"""Correctness rewards per problem type (method.md, "Reward (correctness only)").

The answer is the text inside ``<answer>...</answer>`` when present, else the whole text. Rewards lie in
[0, 1]; anything unparsable scores 0 and model output never raises. An unknown ``problem_type`` is a data
error and raises ``ValueError``.

Choices where method.md is silent:
- With several ``<answer>`` blocks the last complete one wins (the final answer after any reasoning); an
  unclosed ``<answer>`` (generation cut at the token limit) yields the text after it.
- multiple choice: before taking the first character, whitespace and wrapping punctuation ``.()[]*:`` are
  stripped (``"(B)."`` answers ``B``); the comparison is case-sensitive, as option letters are capitals.
- numerical / regression: numbers are parsed after removing commas; NaN/inf count as unparsable. Regression
  with ground truth 0 (relative error undefined) scores 1 for an exact 0 and 0 otherwise.
- free-form: ROUGE-1/2/L F1 on lower-cased Unicode alphanumeric words, without stemming (the reference
  ``rouge_score`` uses a Porter stemmer; implementing it is out of scope and only changes inflected forms).
- OCR: word error rate = word-level Levenshtein distance / max(1, number of reference words).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

PROBLEM_TYPES: tuple[str, ...] = ("multiple choice", "numerical", "OCR", "free-form", "regression")

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN_RE = re.compile(r"<answer>", re.IGNORECASE)
_WORD_RE = re.compile(r"[^\W_]+")
_MC_STRIP = " \t\r\n.()[]*:"


def extract_answer(text: str) -> str:
    """The answer part of a model output or ground truth: inside the last ``<answer>`` block, else the text."""
    if not isinstance(text, str):
        return ""
    matches = _ANSWER_RE.findall(text)
    if matches:
        return matches[-1].strip()
    opened = list(_OPEN_RE.finditer(text))
    if opened:
        return text[opened[-1].end() :].strip()
    return text.strip()


def parse_number(text: str) -> float | None:
    """``float(text)`` after removing commas and whitespace; ``None`` when unparsable or not finite."""
    try:
        value = float(text.replace(",", "").strip())
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def multiple_choice_reward(pred: str, gt: str) -> float:
    p, g = pred.strip(_MC_STRIP), gt.strip(_MC_STRIP)
    return 1.0 if p and g and p[0] == g[0] else 0.0


def numerical_reward(pred: str, gt: str) -> float:
    if ("." in pred) != ("." in gt):
        return 0.0
    p, g = parse_number(pred), parse_number(gt)
    if p is None or g is None:
        return 0.0
    return 1.0 if round(p, 2) == round(g, 2) else 0.0


def regression_reward(pred: str, gt: str) -> float:
    p, g = parse_number(pred), parse_number(gt)
    if p is None or g is None:
        return 0.0
    if g == 0.0:
        return 1.0 if p == 0.0 else 0.0
    return 1.0 - min(1.0, abs(p - g) / abs(g))


def edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two word sequences (unit insert/delete/substitute costs)."""
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, start=1):
        cur = [i]
        for j, wb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb)))
        prev = cur
    return prev[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = reference.split(), hypothesis.split()
    return edit_distance(ref, hyp) / max(1, len(ref))


def ocr_reward(pred: str, gt: str) -> float:
    return min(1.0, max(0.0, 1.0 - word_error_rate(gt, pred)))


def rouge_tokens(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_n_f1(pred: list[str], ref: list[str], n: int) -> float:
    p = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
    r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
    overlap = sum((p & r).values())
    return _f1(overlap, sum(p.values()), sum(r.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for wa in a:
        cur = [0]
        for j, wb in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if wa == wb else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_f1(pred: list[str], ref: list[str]) -> float:
    return _f1(lcs_length(pred, ref), len(pred), len(ref))


def free_form_reward(pred: str, gt: str) -> float:
    p, r = rouge_tokens(pred), rouge_tokens(gt)
    score = (rouge_n_f1(p, r, 1) + rouge_n_f1(p, r, 2) + rouge_l_f1(p, r)) / 3
    return min(1.0, max(0.0, score))


_REWARDS = {
    "multiple choice": multiple_choice_reward,
    "numerical": numerical_reward,
    "OCR": ocr_reward,
    "free-form": free_form_reward,
    "regression": regression_reward,
}


def _check_problem_type(problem_type: str) -> None:
    if problem_type not in _REWARDS:
        raise ValueError(f"unknown problem_type {problem_type!r}; expected one of {list(PROBLEM_TYPES)}")


def compute_reward(prediction: str, ground_truth: str, problem_type: str) -> float:
    """Correctness reward in [0, 1] of one model output against the ground truth (both may hold ``<answer>``)."""
    _check_problem_type(problem_type)
    if not isinstance(prediction, str) or not isinstance(ground_truth, str):
        return 0.0
    return float(_REWARDS[problem_type](extract_answer(prediction), extract_answer(ground_truth)))


def batch_rewards(predictions: list[str], ground_truth: str, problem_type: str) -> np.ndarray:
    """Rewards of all combinations' answers to one question, ``float32 [len(predictions)]``."""
    _check_problem_type(problem_type)
    return np.asarray([compute_reward(p, ground_truth, problem_type) for p in predictions], dtype=np.float32)
