"""Learning check: a short in-process training run (RewardWorker + PolicyUpdater, the debug-local config) must
move the policy towards the tokens that hold the answer.

Eight colour questions are rolled out again and again (fresh combinations every time, 24 updates of 8, the
config's own schedule): the asked box's token must rise towards the top of its frame's ranking on those
questions (mean rank halved and at most 2; top-1 rate not lower). A broken sign, advantage, log-prob, sampler
or update leaves the ranks flat or makes them worse. (Held-out questions are not asked of 12 updates: memorising
8 questions at this lr does not transfer; `docs/report` shows what the full run learns
on held-out questions.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cacovid_rl.config import load_config
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import load_records
from cacovid_rl.data.synthetic import make_synthetic
from cacovid_rl.data.video import read_frames
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.rl.update import PolicyUpdater
from cacovid_rl.rl.worker import RewardWorker, WorkItem

DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug_local.yaml"
UPDATES = 24


def _oracle_ranks(worker: RewardWorker, questions) -> tuple[float, float]:
    """(top-1 rate, mean rank) of the answer tokens inside their frames. A tie counts against the answer token
    (its rank is the number of other tokens scoring at least as high), so a collapsed policy that scores every
    token alike ranks last, not first."""
    top1, ranks = [], []
    with torch.no_grad():
        for enc, oracle in questions:
            token = worker.policy.score(enc).token
            r = [int((token[o // token.shape[1]] >= token.reshape(-1)[o]).sum()) - 1 for o in oracle]
            top1.append(min(r) == 0)
            ranks.append(min(r))
    return float(np.mean(top1)), float(np.mean(ranks))


@pytest.mark.slow
def test_training_moves_the_policy_to_the_answer_tokens(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_synthetic(data, n=200, seed=11, numerical_fraction=0.0)
    cfg = load_config(DEBUG_CONFIG, [f"data.train_path={data / 'train.json'}", f"data.video_root={data}", "seed=0"])
    worker = RewardWorker(cfg)
    updater = PolicyUpdater(worker.policy, cfg.learner, cfg.loss, cfg.rollout.iterations)

    raw = {r["problem_id"]: r for r in json.loads((data / "train.json").read_text())}
    train = []
    for rec in load_records(data / "train.json", data).records:
        meta = raw[rec.sample_id]["meta"]
        if not meta["prior"] and meta["oracle_tokens"] and len(train) < 8:
            enc = worker.adapter.encode(read_frames(rec.video, 8), build_prompt(rec.problem, rec.problem_type))
            train.append((rec, enc, meta["oracle_tokens"]))
    assert len(train) == 8
    seen = [(enc, oracle) for _, enc, oracle in train]
    top1_before, rank_before = _oracle_ranks(worker, seen)

    qps = cfg.learner.questions_per_step
    for step in range(UPDATES):
        trajs = []
        for i in range(qps):
            rec = train[i % len(train)][0]
            status, payload = worker.run(WorkItem(step * qps + i, step, step, WorkItem.record_to_dict(rec)))
            assert status["status"] == "ok", status
            trajs.append(Trajectory.from_bytes(payload))
        metrics = updater.update(trajs)
        assert np.isfinite(metrics["loss/total"])
        worker.policy.eval()

    top1_after, rank_after = _oracle_ranks(worker, seen)
    # Measured with the official sampling (data seed 11, policy seed 0): top-1 0.25 -> 0.75, mean rank 3.4 -> 0.5
    # after 24 updates (12 updates: 3.4 -> 2.6, not yet halved; 40: 3.4 -> 0.5). A broken sign, advantage, log-prob,
    # sampler or update leaves the ranks flat or makes them worse; a collapsed policy (all scores equal) ranks last
    # because ties count against the answer token. The rank is the robust signal; top-1 over 8 questions moves in
    # steps of 1/8 and only has to not get worse.
    assert rank_after <= min(rank_before / 2, 2.0), (rank_before, rank_after)
    assert top1_after >= top1_before, (top1_before, top1_after)
