"""GPU suite (issue 17): every efficiency claim of the project measured side by side in one command.

``python -m benchmarks.gpu_suite --device cuda --out benchmarks/results/gpu_suite.json`` builds LLaVA-OneVision-7B
and Qwen2.5-VL-7B from the configs in ``benchmarks/model_configs/`` (random weights, bf16, no downloads) and runs
sections (a)-(h) (``sections.py``); ``--device cpu --quick`` runs the same code paths at tiny widths (CI).
See ``benchmarks/README.md`` ("GPU suite") for what each section compares against.
"""

from benchmarks.gpu_suite.runner import main

__all__ = ["main"]
