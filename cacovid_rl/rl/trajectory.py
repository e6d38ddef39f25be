"""The actor -> learner message: one question's rollout as numpy arrays, encoded with msgpack.

What crosses is the policy *input* (the full LLM input embeddings + positions), not frames: the
learner then needs no frozen LLM at all, only the policy. Measured trade-off in
``docs/ARCHITECTURE.md`` ("What crosses from actor to learner").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cacovid_rl.rl.rollout import RolloutResult
from cacovid_rl.types import PolicyScores
from cacovid_rl.wire import WireError, packb, unpackb

# bf16 has no numpy dtype; fp16 keeps its precision for embedding magnitudes (|x| < 65504).
_TRANSFER_DTYPES = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.float16}


def _frames_with_kept_tokens(keep: torch.Tensor, t: int, n: int) -> torch.Tensor:
    """``[..., T]`` bool: frames holding at least one of the kept flat indices ``keep`` ``[..., K]``."""
    mask = torch.zeros(*keep.shape[:-1], t, dtype=torch.bool, device=keep.device)
    return mask.scatter_(-1, torch.div(keep.long(), n, rounding_mode="floor"), True)


@dataclass
class Trajectory:
    sample_id: str
    epoch: int
    batch_index: int
    weight_version: int
    problem_type: str
    inputs_embeds: np.ndarray  # [L, D]; float16 when the LLM runs in 16 bits, else float32
    position_ids: np.ndarray  # [L] or [3, L]
    video_start: int
    num_frames: int
    tokens_per_frame: int
    old_token_scores: np.ndarray  # [T, N] float32
    old_frame_scores: np.ndarray  # [T] float32
    keep_flat: np.ndarray  # all kept indices, concatenated over samples (int32)
    keep_lengths: np.ndarray  # K of each sample (int32)
    modes: np.ndarray  # [S] int8
    rewards: np.ndarray  # [S] float32
    iterations: np.ndarray  # [S] int8: iteration each sample was drawn in
    rates: np.ndarray  # [I] float32: rate used in each iteration
    actor_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    frame_mask: np.ndarray | None = None
    """``[S, T]`` uint8: the frames the frame loss counts as kept (for frame-mode samples the *drawn* frames, as
    the official loss; ``types.Combinations.frame_mask``). ``None`` in messages from before this field: the
    frames holding a kept token (:meth:`frame_masks`)."""

    @classmethod
    def from_rollout(
        cls,
        res: RolloutResult,
        *,
        sample_id: str,
        epoch: int,
        batch_index: int,
        weight_version: int,
        problem_type: str,
        actor_id: str = "",
    ) -> Trajectory:
        mem, enc = res.memory, res.enc
        t, n = enc.num_frames, enc.tokens_per_frame
        frame_rows = [
            fm if fm is not None else _frames_with_kept_tokens(k, t, n)
            for k, fm in zip(mem.keep, mem.frame_mask or [None] * len(mem.keep), strict=True)
        ]
        keep = torch.cat([k.reshape(-1) for k in mem.keep]).to(torch.int32)
        lengths = torch.cat([torch.full((k.shape[0],), k.shape[1], dtype=torch.int32) for k in mem.keep])
        emb = enc.inputs_embeds.detach()
        # One device-side cast (bf16 -> fp16 directly: 4x faster than through fp32 at 7B size).
        emb_np = emb.to(_TRANSFER_DTYPES.get(emb.dtype, torch.float32)).cpu().numpy()
        return cls(
            sample_id=sample_id,
            epoch=epoch,
            batch_index=batch_index,
            weight_version=weight_version,
            problem_type=problem_type,
            inputs_embeds=emb_np,
            position_ids=enc.position_ids.detach().cpu().numpy().astype(np.int32),
            video_start=enc.video_start,
            num_frames=enc.num_frames,
            tokens_per_frame=enc.tokens_per_frame,
            old_token_scores=res.old.token.detach().float().cpu().numpy(),
            old_frame_scores=res.old.frame.detach().float().cpu().numpy(),
            keep_flat=keep.numpy(),
            keep_lengths=lengths.numpy(),
            modes=torch.cat(mem.mode).to(torch.int8).numpy(),
            rewards=torch.cat(mem.rewards).float().numpy(),
            iterations=torch.cat(mem.iteration).to(torch.int8).numpy(),
            rates=np.asarray(mem.rates, dtype=np.float32),
            actor_id=actor_id,
            timings=dict(res.timings),
            frame_mask=torch.cat([f.reshape(len(f), t) for f in frame_rows]).to(torch.uint8).cpu().numpy(),
        )

    # -- views the learner needs -------------------------------------------------------------
    def keep_list(self) -> list[torch.Tensor]:
        bounds = np.cumsum(self.keep_lengths)[:-1]
        return [torch.from_numpy(np.array(a, dtype=np.int64)) for a in np.split(self.keep_flat, bounds)]

    def frame_masks(self) -> torch.Tensor:
        """``[S, T]`` bool frame masks of all samples: the shipped ones, else derived from the kept tokens."""
        if self.frame_mask is not None:
            return torch.from_numpy(np.array(self.frame_mask, dtype=bool).reshape(self.num_samples, self.num_frames))
        keeps = self.keep_list()
        if not keeps:
            return torch.zeros(0, self.num_frames, dtype=torch.bool)
        return torch.stack([_frames_with_kept_tokens(k, self.num_frames, self.tokens_per_frame) for k in keeps])

    def old_scores(self) -> PolicyScores:
        return PolicyScores(
            token=torch.from_numpy(np.array(self.old_token_scores, dtype=np.float32)),
            frame=torch.from_numpy(np.array(self.old_frame_scores, dtype=np.float32)),
        )

    @property
    def num_samples(self) -> int:
        return len(self.rewards)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.__dict__.values() if isinstance(v, np.ndarray))

    # -- wire ----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return packb(self.__dict__)

    @classmethod
    def from_bytes(cls, data: bytes) -> Trajectory:
        raw = unpackb(data, what="trajectory")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise WireError(f"trajectory message has unexpected fields: {exc}") from exc
