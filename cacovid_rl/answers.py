"""The problem types and the ``<answer>`` parsing, shared by data loading, prompts and rewards.

One owner, so that the records' ground truth, the prompt per type and the reward all agree on what a problem type
is and which part of a text is the answer. It imports nothing heavy: ``cacovid_rl.data`` uses it without pulling in
the ROUGE scorer.
"""

from __future__ import annotations

import re

PROBLEM_TYPES: tuple[str, ...] = ("multiple choice", "numerical", "OCR", "free-form", "regression")
"""The five Video-R1 problem types; the names are case-sensitive, as in the official reward."""

# The official pattern: the first complete block, tag name case-sensitive, whitespace inside the tag trimmed.
_ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def extract_answer(text: str) -> str:
    """The inside of the first ``<answer>...</answer>`` block (stripped), else ``text`` unchanged.

    This is the official ``accuracy_reward`` parser: a later block, a ``<Answer>`` tag or an unclosed ``<answer>``
    (generation cut at the token limit) are not answers, and the whole text is then what gets scored. It is
    idempotent (the extracted text holds no ``</answer>``), so a caller may pass either the raw ``solution`` or
    the already extracted ground truth.
    """
    match = _ANSWER_RE.search(text)
    return match.group(1).strip() if match else text
