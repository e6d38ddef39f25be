"""One-call pruned inference: ``CacovidPruner.from_pretrained(path).answer(model, video, question, retention)``.

The pruner encodes the video once with the video LLM, scores every video token with the trained
policy, keeps ``floor(retention * T * N)`` tokens with the evaluation-time selection
(``cacovid_rl.policy.selection.select_tokens``) and answers greedily from the kept tokens (original
position ids, pruned tokens removed from the sequence).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cacovid_rl.config import ModelConfig
from cacovid_rl.models.base import VideoLLMAdapter
from cacovid_rl.models.loading import load_adapter
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.policy.selection import select_tokens


@dataclass
class PrunedAnswer:
    """The answer, the kept video tokens (sorted flat indices into ``T*N``) and per-stage wall times (s).

    ``prompt`` is the text the LLM was asked (after options and the instruction were added), so a caller can
    check it is the one the policy was trained with. ``token_scores`` ``[T, N]`` and ``frame_scores`` ``[T]``
    are the policy's log-odds (what a heatmap of the selection draws); ``frames`` are the decoded frames the
    model saw, kept only when ``answer(..., keep_frames=True)`` asks for them (a long video's frames are large).
    """

    text: str
    kept_indices: np.ndarray
    num_video_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    prompt: str = ""
    token_scores: np.ndarray | None = None
    frame_scores: np.ndarray | None = None
    frames: np.ndarray | None = None

    @property
    def kept_ratio(self) -> float:
        return len(self.kept_indices) / self.num_video_tokens


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def subsample_frames(frames: np.ndarray, num_frames: int) -> np.ndarray:
    """At most ``num_frames`` frames, chosen uniformly (linspace) like the video reader does."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if frames.ndim == 4 and frames.shape[0] > num_frames:
        idx = np.linspace(0, frames.shape[0] - 1, num_frames).round().astype(np.int64)
        return frames[idx]
    return frames


class CacovidPruner:
    """A trained CaCoVID policy plus the video LLMs it prunes for (loaded once per path and cached)."""

    def __init__(self, policy: CacovidPolicy, device: str | torch.device | None = None, imp_ratio: float = 0.5) -> None:
        self.device = torch.device(device or _default_device())
        self.policy = policy.to(self.device).eval()
        self.imp_ratio = imp_ratio
        self._adapters: dict[str, VideoLLMAdapter] = {}

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device | None = None, imp_ratio: float = 0.5
    ) -> CacovidPruner:
        """Load a policy saved with ``CacovidPolicy.save_pretrained`` (a training checkpoint's ``policy/``)."""
        return cls(CacovidPolicy.from_pretrained(path), device=device, imp_ratio=imp_ratio)

    def adapter(self, model: VideoLLMAdapter | str | Path) -> VideoLLMAdapter:
        """``model`` itself, or the adapter loaded from the local checkpoint path (``"tiny"`` allowed)."""
        if isinstance(model, VideoLLMAdapter):
            adapter = model
        else:
            key = str(model)
            if key not in self._adapters:
                dtype = "bfloat16" if self.device.type == "cuda" else "float32"
                self._adapters[key] = load_adapter(ModelConfig(path=key, device=str(self.device), dtype=dtype))
            adapter = self._adapters[key]
        if adapter.hidden_size != int(self.policy.text_config.hidden_size):
            raise ValueError(
                f"the policy was trained for hidden size {self.policy.text_config.hidden_size}, "
                f"the video LLM has {adapter.hidden_size}: use the policy trained for this LLM"
            )
        return adapter

    def _policy_on(self, device: torch.device) -> CacovidPolicy:
        if next(self.policy.parameters()).device != device:
            self.policy.to(device)
        return self.policy

    @torch.no_grad()
    def answer(
        self,
        model: VideoLLMAdapter | str | Path,
        video: str | Path | np.ndarray,
        question: str,
        retention: float,
        num_frames: int = 32,
        max_new_tokens: int = 64,
        *,
        max_fps: float = 1.0,
        problem_type: str | None = None,
        options: Sequence[str] | None = None,
        keep_frames: bool = False,
    ) -> PrunedAnswer:
        """Answer ``question`` about ``video`` (a file path or ``[T, H, W, 3]`` uint8 frames) from a pruned video.

        The policy and the LLM answer best when asked the way they were trained: ``options`` (``"A. red"`` or
        bare ``"red"``, lettered A, B, ...) are appended as the records' ``Options:`` block
        (``data.prompts.problem_with_options``) and imply ``problem_type="multiple choice"``; ``problem_type``
        appends the training prompt's bare-answer instruction (``data.prompts.build_prompt``). With neither,
        the question is sent as written. Timings: ``decode`` (video reading), ``encode`` (vision tower +
        projector), ``score`` (policy), ``select``, ``generate``, ``total``.
        """
        t0 = time.perf_counter()
        adapter = self.adapter(model)
        if isinstance(video, (str, Path)):
            from cacovid_rl.data.video import read_frames

            frames = read_frames(video, num_frames, max_fps)
        elif isinstance(video, np.ndarray):
            frames = subsample_frames(video, num_frames)
        else:
            raise TypeError(f"video must be a file path or a [T, H, W, 3] uint8 array, got {type(video).__name__}")
        prompt = question
        if options:
            from cacovid_rl.data.prompts import problem_with_options

            problem_type = problem_type or "multiple choice"
            if problem_type != "multiple choice":
                raise ValueError(f"options go with problem_type 'multiple choice', not {problem_type!r}")
            prompt = problem_with_options(question, options)
        if problem_type is not None:
            from cacovid_rl.data.prompts import build_prompt

            prompt = build_prompt(prompt, problem_type)
        t1 = time.perf_counter()
        enc = adapter.encode(frames, prompt)
        t2 = self._sync_time(adapter)
        scores = self._policy_on(enc.inputs_embeds.device).score(enc)
        t3 = self._sync_time(adapter)
        keep = select_tokens(scores, retention, self.imp_ratio)
        t4 = self._sync_time(adapter)
        text = adapter.generate(enc, keep[None].to(enc.inputs_embeds.device), max_new_tokens)[0]
        t5 = self._sync_time(adapter)
        timings = {
            "decode": t1 - t0,
            "encode": t2 - t1,
            "score": t3 - t2,
            "select": t4 - t3,
            "generate": t5 - t4,
            "total": t5 - t0,
        }
        return PrunedAnswer(
            text,
            keep.cpu().numpy(),
            enc.num_video_tokens,
            timings,
            prompt=prompt,
            token_scores=scores.token.float().cpu().numpy(),
            frame_scores=scores.frame.float().cpu().numpy(),
            frames=frames if keep_frames else None,
        )

    @staticmethod
    def _sync_time(adapter: VideoLLMAdapter) -> float:
        if adapter.device.type == "cuda":
            torch.cuda.synchronize(adapter.device)
        return time.perf_counter()
