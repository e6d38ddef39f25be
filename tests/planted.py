"""Trajectories with planted rewards, for tests of the learner side (update, checkpoints, learner groups).

The random tiny LLM rarely answers right, so its real rewards are almost all 0 and the advantages vanish; the
learner tests need non-zero, known advantages, so they replace the rewards with a seeded 0/1 draw. (Tests of the
answer -> reward path itself live in tests/integration/test_rollout_end_to_end.py and never plant rewards.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cacovid_rl.config import Config
from cacovid_rl.data.records import QARecord
from cacovid_rl.rl.rollout import rollout_question, sample_generator
from cacovid_rl.rl.trajectory import Trajectory

# Small rollouts (5 token + 2 frame combinations, 3 iterations) and a learning rate that moves the tiny policy
# visibly in a few steps: what every learner-side test shares.
LEARNER_TEST_OVERRIDES = (
    "sampling.num_token=5",
    "sampling.num_frame=2",
    "sampling.rate=0.25",
    "rollout.iterations=3",
    "learner.lr=1e-2",
    "learner.total_steps=10",
)


def circle_record(sample: str) -> QARecord:
    """A two-option multiple-choice question; the frames are random, so only the rewards carry signal."""
    return QARecord(
        sample_id=sample,
        problem="what colour is the circle ? A. red B. blue",
        answer="A",
        solution="<answer>A</answer>",
        problem_type="multiple choice",
        video=Path("unused.mp4"),
        options=("A. red", "B. blue"),
    )


def planted_trajectory(adapter, policy, cfg: Config, sample: str, *, frame_seed: int, reward_seed: int) -> Trajectory:
    """Roll ``sample`` out on random frames, plant 0/1 rewards from ``reward_seed``, and pass the trajectory
    through the wire format (as the learner receives it)."""
    frames = np.random.default_rng(frame_seed).integers(0, 255, (8, 48, 48, 3), dtype=np.uint8)
    rec = circle_record(sample)
    res = rollout_question(
        adapter, policy, rec, frames, cfg.sampling, cfg.rollout, cfg.model, sample_generator(0, sample, 0)
    )
    traj = Trajectory.from_rollout(
        res, sample_id=sample, epoch=0, batch_index=0, weight_version=0, problem_type=rec.problem_type
    )
    traj.rewards = np.random.default_rng(reward_seed).integers(0, 2, traj.num_samples).astype(np.float32)
    return Trajectory.from_bytes(traj.to_bytes())
