"""What every section shares: the run context (settings, model cache, shared Ray), the comparison record and
the paper's figures."""

import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import MIB
from benchmarks.gpu_suite.models import ModelCache

PAPER = {
    "source": "CaCoVID paper (arXiv 2602.01649), LLaVA-OV-7B on GPU",
    "pruning_ms": {"cacovid": 11.2, "prunevid": 34.1, "divprune": 134.3},
    "prefill_ms": {"full": 200.4, "0.25": 53.2},
}
PLAN_S_PER_QUESTION = 5.0 / 8  # configs/llava_ov_7b.yaml: "~5 s per step" at 8 questions per step


@dataclass
class Ctx:
    """What every section sees: the run's settings, the model cache and the results so far."""

    device: str
    dtype: torch.dtype
    quick: bool
    seed: int
    repeats: int  # 0: each section's default
    cache: ModelCache
    results: dict[str, Any] = field(default_factory=dict)
    work: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def reps(self, gpu: int, quick: int) -> int:
        return self.repeats or (quick if self.quick else gpu)

    def ray(self) -> Any:
        """One loopback Ray instance for the sections that need it (f, h), started at first use: a Ray start costs
        seconds. On cuda it has 2 logical GPUs and leaves ``CUDA_VISIBLE_DEVICES`` alone, so that the driver's
        learner (which asks a whole GPU, learner/driver.py) and fractional reward actors all share device 0."""
        import logging

        import ray

        if not ray.is_initialized():
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            if self.cuda:
                os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
            ray.init(
                address="local",
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
                num_cpus=2,
                num_gpus=2 if self.cuda else 0,
                object_store_memory=(4096 if self.cuda else 300) * MIB,
            )
            self._ray_started = True
        return ray

    def close(self) -> None:
        if getattr(self, "_ray_started", False):
            import ray

            ray.shutdown()
            os.environ.pop("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", None)
            self._ray_started = False


def comparison(what: str, a: str, a_value: float, b: str, b_value: float, unit: str) -> dict[str, Any]:
    return {"what": what, "a": a, "a_value": float(a_value), "b": b, "b_value": float(b_value), "unit": unit}


def flash_attn_status() -> str:
    """``installed`` only when ``flash_attn`` imports (its wheel needs a matching CUDA toolkit), else why not."""
    if importlib.util.find_spec("flash_attn") is None:
        return "not installed"
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # a broken build raises anything from ImportError to OSError
        return f"not importable ({type(exc).__name__}: {exc})"
    return "installed"


def set_attention(model: torch.nn.Module, impl: str) -> None:
    """Switch the model's attention kernels in place (transformers 5 re-reads the config at every forward)."""
    model.set_attn_implementation(impl)


def _logits(adapter: Any, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    out = adapter.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask)
    return adapter.lm_head(out.last_hidden_state[:, -1]).float()
