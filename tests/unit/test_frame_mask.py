"""The frame mask travels from the rollout memory through the trajectory wire format into the loss."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

import cacovid_rl.rl.update as update_mod
from cacovid_rl.config import LearnerConfig, LossConfig
from cacovid_rl.rl.rollout import RolloutResult
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.rl.update import PolicyUpdater
from cacovid_rl.types import MODE_CONTENT, MODE_FRAME, MODE_TOKEN, Combinations, PolicyScores, QuestionMemory
from cacovid_rl.wire import packb

T, N = 4, 3


def _trajectory() -> Trajectory:
    """Two iterations: the first with frame masks (frame sample drew frames 1 and 3, but its tokens lie in frame 1
    only), the second without (derived from the kept tokens)."""
    memory = QuestionMemory()
    keep = torch.tensor([[0, 4], [3, 9], [4, 5]])  # content, token, frame rows
    modes = torch.tensor([MODE_CONTENT, MODE_TOKEN, MODE_FRAME])
    drawn = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 1]], dtype=torch.bool)
    memory.append(Combinations(keep=keep, mode=modes, rate=0.5, frame_mask=drawn), torch.tensor([1.0, 0.0, 1.0]))
    memory.append(Combinations(keep=keep, mode=modes, rate=0.5), torch.tensor([0.0, 1.0, 0.0]))
    enc = SimpleNamespace(
        inputs_embeds=torch.zeros(T * N + 2, 2),
        position_ids=torch.arange(T * N + 2),
        video_start=1,
        num_frames=T,
        tokens_per_frame=N,
    )
    old = PolicyScores(token=torch.zeros(T, N), frame=torch.zeros(T))
    res = RolloutResult(enc=enc, old=old, memory=memory)  # type: ignore[arg-type]
    return Trajectory.from_rollout(res, sample_id="s", epoch=0, batch_index=0, weight_version=0, problem_type="OCR")


DRAWN = [[1, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 1]]
DERIVED = [[1, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 0]]


def test_trajectory_carries_the_frame_mask_over_the_wire() -> None:
    traj = _trajectory()
    assert traj.frame_mask is not None and traj.frame_mask.dtype == np.uint8 and traj.frame_mask.shape == (6, T)
    expected = [*DRAWN, *DERIVED]
    back = Trajectory.from_bytes(traj.to_bytes())
    assert back.frame_masks().int().tolist() == expected


def test_trajectory_without_frame_mask_still_decodes() -> None:
    """A message from before the field: frames holding a kept token."""
    fields = dict(_trajectory().__dict__)
    del fields["frame_mask"]
    old = Trajectory.from_bytes(packb(fields))
    assert old.frame_mask is None
    assert old.frame_masks().int().tolist() == [*DERIVED, *DERIVED]


def test_updater_passes_the_frame_masks_of_the_replayed_iteration(monkeypatch) -> None:
    seen: list[torch.Tensor] = []
    real_loss = update_mod.cacovid_loss

    def spy(*args, frame_masks=None, **kwargs):
        seen.append(frame_masks)
        return real_loss(*args, frame_masks=frame_masks, **kwargs)

    head = torch.nn.Linear(1, 1)
    head.param_groups = lambda lr, scale, wd: [{"params": list(head.parameters())}]  # type: ignore[attr-defined]
    scores = PolicyScores(token=head.weight.sum() * torch.ones(T, N), frame=head.weight.sum() * torch.ones(T))
    monkeypatch.setattr(update_mod, "cacovid_loss", spy)
    monkeypatch.setattr(update_mod, "policy_scores_for", lambda policy, traj, device: scores)
    updater = PolicyUpdater(head, LearnerConfig(), LossConfig(), iterations=2)
    traj = _trajectory()
    updater._batch_loss([traj], 0)
    updater._batch_loss([traj], 1)
    assert seen[0].int().tolist() == DRAWN
    assert seen[1].int().tolist() == [*DRAWN, *DERIVED]
