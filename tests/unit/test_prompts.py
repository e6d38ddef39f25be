"""The question prompt is the official query text (grpo_video.py QUESTION_TEMPLATE + TYPE_TEMPLATE)."""

from __future__ import annotations

import pytest

from cacovid_rl.data.prompts import INSTRUCTIONS, build_prompt

# The official TYPE_TEMPLATE strings, verbatim (each starts with a space).
OFFICIAL = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.).",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14).",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer.",
    "free-form": " Please provide your text answer.",
    "regression": " Please provide the numerical value (e.g., 42 or 3.14).",
}


def test_instructions_are_the_official_type_templates() -> None:
    assert INSTRUCTIONS == OFFICIAL


def test_prompt_is_problem_newline_space_instruction() -> None:
    problem = "What is shown?\nOptions:\nA. a cat\nB. a dog  "
    assert build_prompt(problem, "multiple choice") == (
        "What is shown?\nOptions:\nA. a cat\nB. a dog  \n"
        " Please provide only the single option letter (e.g., A, B, C, D, etc.)."
    )  # the problem is not stripped: "{Question}\n" + TYPE_TEMPLATE
    with pytest.raises(ValueError, match="unknown problem_type"):
        build_prompt("q", "essay")


def test_tiny_vlm_token_ids_do_not_depend_on_the_spacing() -> None:
    """The shipped tiny model's word-level tokenizer splits on whitespace: the official spacing gives the token ids
    it was trained on."""
    from transformers import AutoTokenizer

    from cacovid_rl.data import synthetic
    from cacovid_rl.data.prompts import chat_text
    from cacovid_rl.models.loading import TINY_ASSET

    tok = AutoTokenizer.from_pretrained(TINY_ASSET)
    problem = "What colour are the dots in the grey box ?\nOptions:\n" + "\n".join(synthetic.options())
    for problem_type, instruction in INSTRUCTIONS.items():
        ids = tok(chat_text(tok, build_prompt(problem, problem_type)), add_special_tokens=False)["input_ids"]
        before = tok(chat_text(tok, f"{problem.rstrip()}\n{instruction.strip()}"), add_special_tokens=False)
        assert ids == before["input_ids"]
        assert tok.unk_token_id not in ids
