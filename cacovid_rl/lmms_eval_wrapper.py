"""An lmms-eval model that answers from CaCoVID-pruned videos.

Follows lmms-eval's "simple" model interface (``lmms_eval.api.model.lmms``): each request's ``args``
are ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` and ``doc_to_visual(doc)`` returns
the visuals of the document (here: one video path or one ``[T, H, W, 3]`` uint8 frame array).
lmms-eval is optional and imported lazily: with it installed the class subclasses ``lmms`` and is
registered as ``cacovid``; without it the class still works on any objects with that ``args`` layout
(the unit tests use such fakes).

Usage::

    python -m lmms_eval --model cacovid \\
        --model_args pretrained=/ckpt/llava-onevision-qwen2-7b-ov-hf,policy=/run/policy,retention=0.25 \\
        --tasks videomme --batch_size 1
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _lmms_base() -> type:
    try:
        from lmms_eval.api.model import lmms
    except ImportError:
        return object
    return lmms


_Base: Any = _lmms_base()


class CacovidLmms(_Base):
    """lmms-eval model: the video LLM at ``pretrained``, pruned by the policy at ``policy`` to ``retention``."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        policy: str,
        retention: float = 0.25,
        num_frames: int = 32,
        max_fps: float = 1.0,
        max_new_tokens: int = 64,
        device: str | None = None,
        batch_size: int | str = 1,
        imp_ratio: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if _Base is not object:
            super().__init__()
        else:
            self._rank, self._world_size = 0, 1
        if kwargs:
            raise TypeError(f"unknown model_args for cacovid: {sorted(kwargs)}")
        if int(batch_size) != 1:
            raise ValueError("cacovid answers one question at a time (its G pruned copies batch internally)")
        from cacovid_rl.inference import CacovidPruner

        self.pretrained = pretrained
        self.pruner = CacovidPruner.from_pretrained(policy, device=device, imp_ratio=float(imp_ratio))
        self.retention = float(retention)
        self.num_frames = int(num_frames)
        self.max_fps = float(max_fps)
        self.max_new_tokens = int(max_new_tokens)
        self.task_dict: dict[str, Any] = getattr(self, "task_dict", {})
        self.last_timings: list[dict[str, float]] = []

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

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

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy answers from the pruned video, cut at the first ``until`` string of each request."""
        adapter = self.pruner.adapter(self.pretrained)
        out: list[str] = []
        self.last_timings = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            answer = self.pruner.answer(
                adapter,
                self._video(doc_to_visual, doc_id, task, split),
                context,
                self.retention,
                num_frames=self.num_frames,
                max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                max_fps=self.max_fps,
            )
            text = answer.text
            for stop in until:
                if stop:
                    text = text.split(stop, 1)[0]
            out.append(text)
            self.last_timings.append(answer.timings)
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "cacovid supports generate_until only: pruned answers are generated greedily; use a generation "
            "task (output_type: generate_until), not a loglikelihood one"
        )

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("cacovid does not support multi-round generation; use generate_until tasks")


def _register() -> None:
    try:
        from lmms_eval.api.registry import register_model
    except ImportError:
        return
    register_model("cacovid")(CacovidLmms)


_register()
