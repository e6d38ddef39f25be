"""Correctness rewards per problem type: the official ``accuracy_reward`` (method.md, "Reward (correctness only)").

Both texts are parsed with :func:`cacovid_rl.answers.extract_answer` (the first ``<answer>`` block, else the whole
text). With ``fix_official_bugs=False`` every type scores exactly as the official code (tests/golden/rewards.json,
134 cases, to 1e-9), quirks included: multiple choice compares first characters (of the parsed answer, or of the
raw text), numerical answers need the same decimal-mark presence and are compared after ``round(x, 2)``, OCR is
``1 - WER``, free-form the mean ROUGE-1/2/L F1 of the ``rouge_score`` package with its Porter stemmer, regression
``1 - min(1, (|p - g| + 1e-9) / (|g| + 1e-9))``. An unknown ``problem_type`` scores 0 (records with one are
skipped at load time, ``data/records.py``), and nothing a model writes makes a reward raise.

``fix_official_bugs=True`` (the default, ``reward.fix_official_bugs``) changes only what the golden data flags as
evidently wrong; every other case keeps its official value:

- multiple choice: the compared key is the option label, not the first character: leading non-word characters
  plus the first word (``(D)`` -> ``(D``, ``**C**`` -> ``**C``, ``Correct answer: A`` -> ``Correct``,
  ``10`` -> ``10``), and an answer without a word character (empty, ``.``) never matches. So ``(D)`` does not
  match ``(C)``, nor ``Correct answer: A`` the ground truth ``C``, nor ``10`` the option ``1``, nor an empty
  answer an empty ground truth. What the official code accepts stays accepted (``C) a red umbrella``,
  ``C is correct``, the raw text's first option) and what it rejects stays rejected (``(C)`` vs ``C``).
- numerical and regression numbers: a comma followed by groups of exactly three digits (``2,500``,
  ``1,234,567.5``) separates thousands; a single other comma is a decimal mark (``3,5`` is 3.5); any other use
  keeps the official reading (commas deleted, and for numerical the comma counts as a decimal mark).
- free-form: words of non-Latin scripts are kept (the official tokenizer keeps only ``[a-z0-9]``, so identical
  Cyrillic text scores 0 there): Han and kana characters are one token each (they are written without spaces),
  other scripts' letters form words with their combining marks. Latin letters outside a-z stay separators
  exactly as in ``rouge_score`` (``naïve`` -> ``na ve``), so Latin text scores as in the official code. ROUGE-2
  is left out of the mean when neither text has a bigram (it is 0/0 there, not a mismatch): an identical
  one-word answer scores 1, not 2/3.
- regression: a non-finite prediction or ground truth scores 0 (the official code scores ``nan`` 1 through
  ``max(0.0, nan) = 0.0``); ground truth 0 scores 1 for ``|p| <= 1e-9`` (the official formula's own resolution)
  and 0 otherwise (the official code scores 0 for every prediction); the ``1e-9`` guard terms are capped at
  ``1e-6 * |g|`` so that they do not dominate tiny magnitudes (``1e-12`` vs ``2e-12`` scores 0.5, not 0.001).
  For ``|g| >= 1e-3`` the guard is the official 1e-9, so those rewards are unchanged.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

from cacovid_rl.answers import PROBLEM_TYPES, extract_answer

__all__ = [
    "PROBLEM_TYPES",
    "batch_rewards",
    "compute_reward",
    "extract_answer",
    "mc_option_key",
    "mc_prefix_decided",
    "rouge_tokens",
]

log = logging.getLogger(__name__)
_warned_types: set[str] = set()

# -- multiple choice ---------------------------------------------------------------------------------------------

# Leading non-word characters, then the first word: the option label as the answer writes it.
_MC_KEY_RE = re.compile(r"\W*\w+")
_MC_DECIDED_RE = re.compile(r"\W*\w+\W")


def _mc_stripped(text: str) -> str:
    """The official normalisation before the first character is read: whitespace, then periods, off both ends."""
    return text.strip().strip(".")


def mc_option_key(text: str) -> str | None:
    """The option label of a multiple-choice answer (``fix_official_bugs``): leading non-word characters and the
    first word of the normalised text; ``None`` when it has no word character (empty, periods only)."""
    m = _MC_KEY_RE.match(_mc_stripped(text))
    return m.group() if m else None


def _mc_official(answer: str, raw: str, gt: str) -> float:
    g = _mc_stripped(gt)[:1]
    return 1.0 if _mc_stripped(answer)[:1] == g or _mc_stripped(raw)[:1] == g else 0.0


def _mc_fixed(answer: str, raw: str, gt: str) -> float:
    g = mc_option_key(gt)
    if g is None:
        return 0.0
    return 1.0 if mc_option_key(answer) == g or mc_option_key(raw) == g else 0.0


def mc_prefix_decided(text: str) -> bool:
    """Whether every continuation of ``text`` has the same multiple-choice reward as ``text`` itself, under both
    the official and the fixed rule, for a vocabulary that cannot write ``<answer>`` (so the parsed answer is the
    raw text).

    The fixed key is final once its first word has ended (a non-word character follows it); the official first
    character is final as soon as any character other than whitespace and ``.`` occurs, which that implies.
    ``\\ufffd`` (an incomplete UTF-8 sequence that later tokens may complete) makes nothing final.
    """
    if "\ufffd" in text:
        return False
    return _MC_DECIDED_RE.match(text.lstrip().lstrip(".")) is not None


# -- numbers -----------------------------------------------------------------------------------------------------

_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def _float_official(text: str) -> float | None:
    """The official ``normalize_number``: commas deleted, then ``float``; ``None`` when that fails."""
    try:
        return float(text.replace(",", ""))
    except (ValueError, OverflowError):
        return None


def _read_number(text: str) -> tuple[float | None, bool]:
    """A number and whether it is written with a decimal mark, reading commas as thousands separators or as a
    decimal mark (module docstring); other comma uses keep the official reading."""
    s = text.strip()
    if _THOUSANDS_RE.fullmatch(s):
        return _float_official(s), "." in s
    if s.count(",") == 1 and "." not in s:
        return _float_official(s.replace(",", ".")), True
    return _float_official(s), "." in s or "," in s


def _numerical_official(answer: str, gt: str) -> float:
    if (("." in gt) or ("," in gt)) != (("." in answer) or ("," in answer)):
        return 0.0
    g, p = _float_official(gt), _float_official(answer)
    if g is None or p is None:
        return 0.0
    return 1.0 if round(g, 2) == round(p, 2) else 0.0


def _numerical_fixed(answer: str, gt: str) -> float:
    g, g_decimal = _read_number(gt)
    p, p_decimal = _read_number(answer)
    if g_decimal != p_decimal or g is None or p is None:
        return 0.0
    return 1.0 if round(g, 2) == round(p, 2) else 0.0


def _regression_official(answer: str, gt: str) -> float:
    g, p = _float_official(gt), _float_official(answer)
    if g is None or p is None:
        return 0.0
    rel = (abs(p - g) + 1e-9) / (abs(g) + 1e-9)
    return 1.0 - min(1.0, max(0.0, rel))  # max(0.0, nan) is 0.0: a nan scores 1, as in the official code


def _regression_fixed(answer: str, gt: str) -> float:
    g, _ = _read_number(gt)
    p, _ = _read_number(answer)
    if g is None or p is None or not (math.isfinite(g) and math.isfinite(p)):
        return 0.0
    if g == 0.0:
        return 1.0 if abs(p) <= 1e-9 else 0.0
    eps = min(1e-9, 1e-6 * abs(g))
    return 1.0 - min(1.0, (abs(p - g) + eps) / (abs(g) + eps))


# -- OCR ---------------------------------------------------------------------------------------------------------


def _edit_distance(a: list[str], b: list[str]) -> int:
    """Word-level Levenshtein distance (unit insert/delete/substitute costs)."""
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, start=1):
        cur = [i]
        for j, wb in enumerate(b, start=1):
            cur.append(prev[j - 1] if wa == wb else 1 + min(prev[j], cur[j - 1], prev[j - 1]))
        prev = cur
    return prev[-1]


def _ocr(answer: str, gt: str) -> float:
    """``1 - WER`` (case-sensitive, whitespace-split words, over ``max(1, reference words)``), clipped to [0, 1]."""
    ref = gt.split()
    wer = _edit_distance(ref, answer.split()) / max(1, len(ref))
    return max(0.0, min(1.0, 1.0 - wer))


# -- free-form ---------------------------------------------------------------------------------------------------

_ASCII_TOKEN_RE = re.compile(r"^[a-z0-9]+$")
# Han ideographs (with extensions and compatibility forms) and kana: scripts written without spaces.
_CJK_RE = re.compile(
    "[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]"
)


def _is_ascii_word_char(ch: str) -> bool:
    return "a" <= ch <= "z" or "0" <= ch <= "9"


def _is_script_word_char(ch: str) -> bool:
    """A letter or digit of a non-Latin script. Latin letters outside a-z, and everything else below U+0250 (the
    Latin-1 and Latin Extended blocks: ``ª``, ``²``, ``½``...), are separators, as in ``rouge_score``."""
    return ch.isalnum() and ord(ch) >= 0x250 and "LATIN" not in unicodedata.name(ch, "")


def rouge_tokens(text: str, stemmer=None) -> list[str]:
    """The fixed free-form tokenizer: ``rouge_score``'s tokens plus the words of non-Latin scripts.

    On text whose letters are all Latin it returns exactly ``rouge_score.tokenize.tokenize(text, stemmer)``:
    lower-cased ``[a-z0-9]`` runs, Porter-stemmed when longer than 3 characters. Han and kana characters are one
    token each; letters and digits of other scripts form words together with their combining marks (vowel signs
    of Indic scripts, decomposed accents), and are not stemmed (the Porter stemmer is English).
    """
    tokens: list[str] = []
    run: list[str] = []
    kind = ""  # "ascii" / "script" while a run is open

    def close() -> None:
        nonlocal kind
        if run:
            word = "".join(run)
            if kind == "ascii":
                if stemmer is not None and len(word) > 3:
                    word = stemmer.stem(word)
                if _ASCII_TOKEN_RE.match(word):
                    tokens.append(word)
            else:
                tokens.append(word)
            run.clear()
        kind = ""

    for ch in text.lower():
        if _is_ascii_word_char(ch):
            if kind != "ascii":
                close()
                kind = "ascii"
            run.append(ch)
        elif _CJK_RE.match(ch):
            close()
            tokens.append(ch)
        elif _is_script_word_char(ch) or (kind == "script" and unicodedata.category(ch).startswith("M")):
            if kind != "script":
                close()
                kind = "script"
            run.append(ch)
        else:
            close()
    close()
    return tokens


class _ScriptTokenizer:
    """``rouge_score`` tokenizer interface (``tokenize(text)``) around :func:`rouge_tokens` with stemming."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text, self._stemmer)


@cache
def _script_tokenizer() -> _ScriptTokenizer:
    return _ScriptTokenizer()


@cache
def _rouge_scorer(fixed: bool):
    """One scorer per tokenizer, built on first use: ``rouge_score`` imports nltk, which is slow to load."""
    from rouge_score import rouge_scorer

    kinds = ["rouge1", "rouge2", "rougeL"]
    if fixed:
        return rouge_scorer.RougeScorer(kinds, tokenizer=_script_tokenizer())
    return rouge_scorer.RougeScorer(kinds, use_stemmer=True)


def _free_form(answer: str, gt: str, fixed: bool) -> float:
    scorer = _rouge_scorer(fixed)
    s = scorer.score(gt, answer)
    parts = [s["rouge1"].fmeasure, s["rouge2"].fmeasure, s["rougeL"].fmeasure]
    if fixed and len(_script_tokenizer().tokenize(gt)) < 2 and len(_script_tokenizer().tokenize(answer)) < 2:
        parts.pop(1)  # neither text has a bigram
    return max(0.0, min(1.0, sum(parts) / len(parts)))


# -- dispatch ----------------------------------------------------------------------------------------------------

_Scorer = Callable[[str, str, str], float]  # (parsed answer, raw text, parsed ground truth) -> reward

_OFFICIAL: dict[str, _Scorer] = {
    "multiple choice": _mc_official,
    "numerical": lambda a, raw, g: _numerical_official(a, g),
    "OCR": lambda a, raw, g: _ocr(a, g),
    "free-form": lambda a, raw, g: _free_form(a, g, fixed=False),
    "regression": lambda a, raw, g: _regression_official(a, g),
}
_FIXED: dict[str, _Scorer] = {
    "multiple choice": _mc_fixed,
    "numerical": lambda a, raw, g: _numerical_fixed(a, g),
    "OCR": lambda a, raw, g: _ocr(a, g),
    "free-form": lambda a, raw, g: _free_form(a, g, fixed=True),
    "regression": lambda a, raw, g: _regression_fixed(a, g),
}


def compute_reward(prediction: str, ground_truth: str, problem_type: str, fix_official_bugs: bool = True) -> float:
    """Correctness reward in [0, 1] of one model output against the ground truth.

    ``ground_truth`` may be the record's raw ``solution`` (``<answer>X</answer>``) or its extracted answer: the
    parsing is idempotent. ``fix_official_bugs``: module docstring (``False`` is the official reward exactly).
    """
    table = _FIXED if fix_official_bugs else _OFFICIAL
    scorer = table.get(problem_type)
    if scorer is None:
        if problem_type not in _warned_types:
            _warned_types.add(problem_type)
            log.warning("unknown problem_type %r scores 0; expected one of %s", problem_type, list(PROBLEM_TYPES))
        return 0.0
    if not isinstance(prediction, str) or not isinstance(ground_truth, str):
        return 0.0
    try:
        return float(scorer(extract_answer(prediction), prediction, extract_answer(ground_truth)))
    except Exception:  # the official code scores any failure 0; a model's text must never stop a rollout
        log.debug("reward of %r (%s) failed; scoring 0", prediction, problem_type, exc_info=True)
        return 0.0


def batch_rewards(
    predictions: Sequence[str], ground_truth: str, problem_type: str, fix_official_bugs: bool = True
) -> np.ndarray:
    """Rewards of all combinations' answers to one question, ``float32 [len(predictions)]`` (the official trainer
    also holds them in float32)."""
    return np.asarray(
        [compute_reward(p, ground_truth, problem_type, fix_official_bugs) for p in predictions], dtype=np.float32
    )
