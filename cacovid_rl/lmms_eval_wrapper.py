"""An lmms-eval model that answers from CaCoVID-pruned videos: ``python -m lmms_eval --model cacovid``.

Registered without a fork, the way lmms-eval 0.7 finds third-party models: this package declares an
entry point in the ``lmms_eval.models`` group (``pyproject.toml``) whose payload, ``manifest()``, is a
``ModelManifest`` naming ``CacovidLmms`` as a "simple" model. Installing the package (``pip install
'cacovid-rl[lmms]'``) is all it takes; ``--include_path`` is for tasks, not models.

``CacovidLmms`` follows lmms-eval's simple model interface: each request's ``args`` are ``(context,
gen_kwargs, doc_to_visual, doc_id, task, split)`` and ``doc_to_visual(doc)`` returns the document's
visuals (here one video path or one ``[T, H, W, 3]`` uint8 frame array). Answers come back as lmms-eval
``GenerationResult`` objects whose token counts also carry the kept and total video tokens, so a run's
``--log_samples`` output records the retention actually applied to every question.

Usage (README, "Evaluating with lmms-eval")::

    python -m lmms_eval --model cacovid \\
        --model_args pretrained=/ckpt/llava-onevision-qwen2-7b-ov-hf,policy=/run/policy,retention=0.1 \\
        --tasks videomme --batch_size 1

``method=<name>`` answers with any training-free baseline instead of the policy, at the same budget and through
the same compression interface as ``cacovid-rl eval`` (``cacovid_rl.baselines.METHODS``; ``policy`` is then not
needed), e.g. ``--model_args pretrained=/ckpt/llava-onevision-qwen2-7b-ov-hf,method=flashvid,retention=0.1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from lmms_eval.api.instance import GenerationResult, TokenCounts
    from lmms_eval.api.model import lmms
except ImportError as exc:  # the optional extra is missing: say how to get it, not just "No module named"
    raise ImportError(
        "cacovid_rl.lmms_eval_wrapper needs lmms-eval: pip install 'cacovid-rl[lmms]' "
        "(pins lmms-eval==0.7.3 and the versions it needs)"
    ) from exc

MODEL_NAME = "cacovid"


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point's payload: ``cacovid`` is ``CacovidLmms``, a simple model.

    A callable rather than a module-level object so that loading the entry point imports nothing but
    lmms-eval's own registry types.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.CacovidLmms")


@dataclass
class VideoTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus the video tokens kept by the policy and the total encoded.

    ``to_dict`` adds them to what lmms-eval logs per sample (``token_counts`` in ``--log_samples`` files).
    """

    video_tokens_kept: int | None = None
    video_tokens_total: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        d = super().to_dict()
        d["video_tokens_kept"] = self.video_tokens_kept
        d["video_tokens_total"] = self.video_tokens_total
        return d


class CacovidLmms(lmms):
    """lmms-eval model: the video LLM at ``pretrained``, pruned to ``retention`` by the policy at ``policy`` or by the
    training-free ``method``."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        policy: str = "",
        retention: float = 0.25,
        num_frames: int = 32,
        max_fps: float = 1.0,
        max_new_tokens: int = 64,
        device: str | None = None,
        batch_size: int | str = 1,
        imp_ratio: float = 0.5,
        method: str = "cacovid",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        """``model_args`` of ``--model cacovid``: ``pretrained`` (a local checkpoint directory or ``tiny``),
        ``policy`` (a saved policy directory), ``retention`` (kept fraction of the video tokens),
        ``num_frames`` / ``max_fps`` (frame sampling), ``max_new_tokens`` (used when the task sets none),
        ``imp_ratio`` (the evaluation-time selection's importance share), ``method`` (``cacovid``, the default,
        or a training-free baseline of ``cacovid_rl.baselines.METHODS``), ``seed`` (the ``random`` baseline's)."""
        super().__init__()
        # lmms-eval passes max_batch_size along with batch_size; None values are already dropped.
        kwargs.pop("max_batch_size", None)
        if kwargs:
            raise TypeError(f"unknown model_args for cacovid: {sorted(kwargs)}")
        if int(batch_size) != 1:
            raise ValueError("cacovid answers one question at a time (its G pruned copies batch internally)")
        from cacovid_rl.baselines import METHODS

        self.method = str(method)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; available: {list(METHODS)}")
        self.pretrained = str(pretrained)
        self._device_arg = device
        self.seed = int(seed)
        self.pruner = None
        self._adapter = None
        if self.method == "cacovid":
            if not policy:
                raise ValueError("method=cacovid needs policy=<saved policy directory>")
            from cacovid_rl.inference import CacovidPruner

            self.pruner = CacovidPruner.from_pretrained(str(policy), device=device, imp_ratio=float(imp_ratio))
        self.retention = float(retention)
        self.num_frames = int(num_frames)
        self.max_fps = float(max_fps)
        self.max_new_tokens = int(max_new_tokens)
        self.last_timings: list[dict[str, float]] = []

    def _video(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> str | np.ndarray:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
        if len(visuals) != 1:
            raise ValueError(
                f"cacovid prunes exactly one video per question; {task}/{split} doc {doc_id} has {len(visuals)} visuals"
            )
        video = visuals[0]
        if not isinstance(video, (str, np.ndarray)):
            raise TypeError(f"expected a video path or a frame array, got {type(video).__name__} ({task} doc {doc_id})")
        return video

    def adapter(self) -> Any:
        """The video LLM adapter (the pruner's for ``cacovid``; loaded once otherwise)."""
        if self.pruner is not None:
            return self.pruner.adapter(self.pretrained)
        if self._adapter is None:
            import torch

            from cacovid_rl.config import ModelConfig
            from cacovid_rl.models.loading import load_adapter

            device = self._device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
            self._adapter = load_adapter(ModelConfig(path=self.pretrained, device=str(device), dtype=dtype))
        return self._adapter

    def _answer_baseline(self, adapter: Any, video: str | np.ndarray, context: str, max_new_tokens: int) -> Any:
        """Answer with the training-free ``method``: encode, compress to the budget, one greedy pass."""
        import time

        import torch

        from cacovid_rl.baselines import SelectionContext, compress, get_method
        from cacovid_rl.inference import PrunedAnswer, subsample_frames

        t0 = time.perf_counter()
        if isinstance(video, str):
            from cacovid_rl.data.video import read_frames

            frames = read_frames(video, self.num_frames, self.max_fps)
        else:
            frames = subsample_frames(video, self.num_frames)
        t1 = time.perf_counter()
        enc = adapter.encode(frames, context)
        t2 = time.perf_counter()
        ctx = SelectionContext(enc=enc, adapter=adapter, generator=torch.Generator().manual_seed(self.seed))
        block = compress(get_method(self.method), ctx, self.retention)
        t3 = time.perf_counter()
        text = adapter.generate_compressed(enc, [block], max_new_tokens)[0]
        t4 = time.perf_counter()
        timings = {"decode": t1 - t0, "encode": t2 - t1, "select": t3 - t2, "generate": t4 - t3, "total": t4 - t0}
        kept = block.source.cpu().numpy()  # one entry per output token (its representative for merged tokens)
        return PrunedAnswer(text, kept, enc.num_video_tokens, timings, prompt=context)

    def generate_until(self, requests: list[Any]) -> list[GenerationResult]:
        """Greedy answers from the pruned video, cut at the first ``until`` string of each request."""
        adapter = self.adapter()
        out: list[GenerationResult] = []
        self.last_timings = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            video = self._video(doc_to_visual, doc_id, task, split)
            max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            if self.pruner is None:
                answer = self._answer_baseline(adapter, video, context, max_new)
            else:
                answer = self.pruner.answer(
                    adapter,
                    video,
                    context,
                    self.retention,
                    num_frames=self.num_frames,
                    max_new_tokens=max_new,
                    max_fps=self.max_fps,
                )
            text = answer.text
            for stop in until:
                if stop:
                    text = text.split(stop, 1)[0]
            counts = VideoTokenCounts(
                video_tokens_kept=len(answer.kept_indices), video_tokens_total=int(answer.num_video_tokens)
            )
            out.append(GenerationResult(text=text, token_counts=counts))
            self.last_timings.append(answer.timings)
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "cacovid supports generate_until only: pruned answers are generated greedily; use a generation "
            "task (output_type: generate_until), not a loglikelihood one"
        )

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("cacovid does not support multi-round generation; use generate_until tasks")
