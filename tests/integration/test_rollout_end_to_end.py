"""A reward worker's rollout checked end to end on the shipped tiny VLM and real synthetic videos.

Nothing is planted: every reward in the trajectory must be the reward function of the answer the frozen LLM
gives to that combination (generated again here, one combination at a time and decoded in full, so neither the
batched decoding nor the multiple-choice fast path is trusted), and the per-iteration keep rates must follow the
official adaptive rule, recomputed here from the trajectory's own rewards.
"""

from __future__ import annotations

import numpy as np
import pytest

from cacovid_rl.config import Config, load_config
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import QARecord, load_records
from cacovid_rl.data.synthetic import make_synthetic
from cacovid_rl.data.video import read_frames
from cacovid_rl.rl.rewards import compute_reward
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.rl.worker import RewardWorker, WorkItem
from cacovid_rl.types import MODE_TOKEN


@pytest.fixture(scope="module")
def rolled_out(tmp_path_factory) -> tuple[Config, RewardWorker, list[tuple[QARecord, Trajectory]]]:
    data = tmp_path_factory.mktemp("rollout_data")
    make_synthetic(data, n=12, seed=3)  # 10 training questions, multiple choice and numerical
    cfg = load_config(
        None,
        [
            "model.path=tiny",
            f"data.train_path={data / 'train.json'}",
            f"data.video_root={data}",
            "data.num_frames=8",
            "model.max_new_tokens=4",
            "sampling.num_content=1",
            "sampling.num_token=7",
            "sampling.num_frame=2",
            # A base rate inside (min_rate, max_rate), so both a halving and a doubling can show.
            "sampling.rate=0.125",
            "rollout.iterations=4",
            "rollout.min_rate=0.0625",
            "rollout.max_rate=0.25",
        ],
    )
    worker = RewardWorker(cfg)
    out = []
    for i, rec in enumerate(load_records(data / "train.json", data).records):
        status, payload = worker.run(WorkItem(i, 0, 0, WorkItem.record_to_dict(rec)))
        assert status.status == "ok", status
        out.append((rec, Trajectory.from_bytes(payload)))
    return cfg, worker, out


def official_rates(traj: Trajectory, cfg: Config, token_only: bool = True) -> list[float]:
    """The official per-question rule (golden ``rate_and_schedule.json``): accuracy starts at 0.5; before each
    iteration the rate halves at accuracy >= high (not below ``min(min_rate, base)``) or doubles at <= low (not
    above ``max(max_rate, base)``); after it the accuracy is the float32 mean of every token-mode reward so far."""
    r, base = cfg.rollout, cfg.sampling.rate
    rate, accuracy, rates = base, 0.5, []
    for it in range(len(traj.rates)):
        if accuracy >= r.high_reward:
            rate = max(rate / 2, min(r.min_rate, base))
        elif accuracy <= r.low_reward:
            rate = min(rate * 2, max(r.max_rate, base))
        rates.append(rate)
        sel = traj.iterations <= it
        if token_only:
            sel &= traj.modes == MODE_TOKEN
        accuracy = float(np.mean(np.asarray(traj.rewards)[sel], dtype=np.float32))
    return rates


def test_rewards_are_the_reward_function_of_the_generated_answers(rolled_out) -> None:
    cfg, worker, trajs = rolled_out
    adapter = worker.adapter
    for rec, traj in trajs:
        frames = read_frames(rec.video, cfg.data.num_frames, cfg.data.max_fps)
        enc = adapter.encode(frames, build_prompt(rec.problem, rec.problem_type))
        answers = [adapter.generate(enc, keep[None], cfg.model.max_new_tokens)[0] for keep in traj.keep_list()]
        expected = [compute_reward(a, rec.answer, rec.problem_type, cfg.reward.fix_official_bugs) for a in answers]
        np.testing.assert_array_equal(traj.rewards, np.asarray(expected, dtype=np.float32), err_msg=rec.sample_id)
    rewards = np.concatenate([t.rewards for _, t in trajs])
    # Both outcomes occur, so rewards held at any constant cannot pass.
    assert 0 < rewards.mean() < 1, rewards.mean()


def test_keep_rates_follow_the_official_adaptive_rule(rolled_out) -> None:
    cfg, _, trajs = rolled_out
    base = cfg.sampling.rate
    for rec, traj in trajs:
        assert traj.rates.tolist() == pytest.approx(official_rates(traj, cfg), abs=1e-7), rec.sample_id
    # The questions exercise every branch: a halving, a doubling, and one where averaging all modes' rewards
    # (not only the token-mode ones) would have chosen another rate.
    assert any(min(t.rates) < base for _, t in trajs) and any(max(t.rates) > base for _, t in trajs)
    assert any(official_rates(t, cfg, token_only=False) != official_rates(t, cfg) for _, t in trajs)
