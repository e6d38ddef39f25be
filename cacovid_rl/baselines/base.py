"""The training-free selector interface shared by all baselines and the CaCoVID policy at evaluation.

A selector picks which video tokens survive at a retention ratio: ``select(ctx, retention)`` returns
``LongTensor[B]`` of sorted, distinct flat indices into the ``T * N`` video block of ``ctx.enc``, with
``B = budget(retention, T * N) = floor(retention * T * N)`` (at least 1). Selectors never modify ``ctx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from cacovid_rl.policy.selection import budget
from cacovid_rl.types import EncodedQuestion, PolicyScores

__all__ = ["ORACLE", "SELECTORS", "SelectionContext", "TokenSelector", "budget", "get_selector", "video_features"]


@dataclass
class SelectionContext:
    """Everything a selector may look at for one question.

    ``adapter`` is the model adapter (FastV asks it for early-layer attention), ``scores`` the CaCoVID
    policy's scores (only the ``cacovid`` selector needs them), ``generator`` the randomness of ``random``,
    ``oracle_tokens`` the flat indices of the tokens known to hold the answer (only the ``oracle`` reference
    needs them; the synthetic records carry them as ``meta.oracle_tokens``).
    """

    enc: EncodedQuestion
    adapter: object | None = None
    scores: PolicyScores | None = None
    generator: torch.Generator | None = None
    oracle_tokens: torch.Tensor | list[int] | None = None


@runtime_checkable
class TokenSelector(Protocol):
    name: str

    def select(self, ctx: SelectionContext, retention: float) -> torch.LongTensor:
        """Sorted flat indices ``[B]`` of the kept video tokens, ``B = budget(retention, T * N)``."""
        ...


def video_features(ctx: SelectionContext) -> torch.Tensor:
    """The question's video tokens as ``[T, N, D]`` float32 (the LLM-input features)."""
    return ctx.enc.video_features().detach().float()


SELECTORS: tuple[str, ...] = ("uniform", "random", "fastv", "visionzip", "divprune", "cacovid")
"""The selectors that work on any question (the oracle reference needs labelled answer tokens: ``ORACLE``)."""
ORACLE = "oracle"


def get_selector(name: str, **kwargs: object) -> TokenSelector:
    """A fresh selector by name (``SELECTORS`` or ``ORACLE``); ``kwargs`` go to its constructor (e.g. ``imp_ratio``)."""
    from cacovid_rl.baselines.cacovid import CacovidSelector
    from cacovid_rl.baselines.divprune import DivPruneSelector
    from cacovid_rl.baselines.fastv import FastVSelector
    from cacovid_rl.baselines.oracle import OracleSelector
    from cacovid_rl.baselines.random_select import RandomSelector
    from cacovid_rl.baselines.uniform import UniformSelector
    from cacovid_rl.baselines.visionzip import VisionZipSelector

    classes: dict[str, type] = {
        "uniform": UniformSelector,
        "random": RandomSelector,
        "fastv": FastVSelector,
        "visionzip": VisionZipSelector,
        "divprune": DivPruneSelector,
        "cacovid": CacovidSelector,
        ORACLE: OracleSelector,
    }
    if name not in classes:
        raise ValueError(f"unknown selector {name!r}; available: {[*SELECTORS, ORACLE]}")
    return classes[name](**kwargs)
