"""The sections (a)-(h) of the GPU suite: each one side-by-side comparison, measured in one run.

Every section takes the run's :class:`Ctx` and returns a dict with ``comparisons`` (a list of
``{"what", "a", "a_value", "b", "b_value", "unit"}``: the two sides of the comparison, what the Markdown table
and the tests read) and its own details. Sizes: the 7B configs and the method's settings on ``cuda``; tiny widths,
few frames and few repeats with ``--quick`` (the same code paths). See ``benchmarks/README.md`` ("GPU suite").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.gpu_suite.context import Ctx
from benchmarks.gpu_suite.loop_sections import section_e, section_f, section_h
from benchmarks.gpu_suite.model_sections import section_a, section_b, section_c, section_d, section_g

__all__ = ["SECTIONS", "Ctx"]

SECTIONS: dict[str, tuple[str, Callable[[Ctx], dict[str, Any]]]] = {
    "a": ("attention kernels on pruned inputs; batched vs HF generate", section_a),
    "b": ("reward path: actor vs reference trainer vs naive", section_b),
    "c": ("pruning latency: CaCoVID vs baselines", section_c),
    "d": ("prefill: all tokens vs 25% vs 10%, physical limit", section_d),
    "e": ("learner: one update at the 7B width", section_e),
    "f": ("weight broadcast to 1-4 actors on the device", section_f),
    "g": ("memory per reward actor vs combinations per forward", section_g),
    "h": ("end to end: 2 reward actors + learner on one device", section_h),
}
