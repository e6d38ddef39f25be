"""Question prompts: the question plus a bare-answer instruction per problem type.

The method answers each combination almost greedily with a short budget, so the prompt asks for the
bare answer (no reasoning, no ``<answer>`` tags). ``chat_text`` is the single place where a prompt
becomes the chat-template string: the model adapters and the tiny-VLM training both call it, so the
token sequences a model was trained on and the ones it is scored on are identical.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from cacovid_rl.answers import PROBLEM_TYPES

# The official per-type instructions (grpo_video.py TYPE_TEMPLATE), appended after "{problem}\n"; each starts
# with a space, so the instruction line begins with one.
INSTRUCTIONS: dict[str, str] = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.).",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14).",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer.",
    "free-form": " Please provide your text answer.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14).",
}


def build_prompt(problem: str, problem_type: str) -> str:
    """The official query: ``problem + "\n"`` then the instruction of its type, the problem kept verbatim."""
    try:
        instruction = INSTRUCTIONS[problem_type]
    except KeyError:
        raise ValueError(f"unknown problem_type {problem_type!r}; expected one of {list(PROBLEM_TYPES)}") from None
    return f"{problem}\n{instruction}"


OPTION_LABEL = re.compile(r"^[A-Z][.)]\s")
"""An option that already carries its letter (``A. red``, ``B) green``), as Video-R1 options do."""


def letter_options(options: Sequence[str]) -> list[str]:
    """Options as ``A. text`` lines: kept verbatim when every one is labelled, lettered A, B, ... when none is.

    Mixed lists are refused rather than guessed: the letters are what a multiple-choice answer names.
    """
    opts = [o.strip() for o in options if o.strip()]
    if not opts:
        raise ValueError("no options given")
    labelled = [bool(OPTION_LABEL.match(o)) for o in opts]
    if all(labelled):
        return opts
    if any(labelled):
        raise ValueError(f"label every option ('A. red') or none ('red'), not some: {opts}")
    if len(opts) > 26:
        raise ValueError(f"at most 26 options can be lettered, got {len(opts)}")
    return [f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(opts)]


def problem_with_options(question: str, options: Sequence[str]) -> str:
    """A multiple-choice record's ``problem``: the question, ``Options:``, then one ``A. text`` option per line.

    The layout every training record has (the synthetic generator, the Video-R1 loader in ``data/records.py`` and
    the benchmark parsers build the same string), so a question asked with this text and ``build_prompt`` is
    the prompt the policy was trained on.
    """
    return question.rstrip("\n") + "\nOptions:\n" + "\n".join(letter_options(options))


def chat_messages(prompt: str, video: bool = True) -> list[dict[str, Any]]:
    """One user turn: a video item (unless ``video=False``, the blind test) followed by the prompt text."""
    content: list[dict[str, Any]] = [{"type": "video"}] if video else []
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def chat_text(processor_or_tokenizer: Any, prompt: str, video: bool = True) -> str:
    """The chat-template string for ``prompt`` with one video item first, ending in the generation prompt.

    Works with a processor or a tokenizer (both expose ``apply_chat_template``). The string holds a
    single video placeholder; the processor expands it to one token per video feature.
    """
    text = processor_or_tokenizer.apply_chat_template(
        chat_messages(prompt, video=video), tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str):  # some processors return a one-element list for a single conversation
        text = text[0]
    return text
