"""The second model family through the whole training loop: a tiny random-weight Qwen2.5-VL on the real driver.

Every other driver test runs the shipped LLaVA-OneVision model, whose positions are 1-D. Qwen2.5-VL's are 3-D
M-RoPE ids (``[3, L]``: time, height, width for video tokens) that travel inside each trajectory from the reward
actor to the learner, which recomputes the actor's policy scores from them. A mismatch anywhere on that path (the
positions dropped or flattened, the wrong rows gathered, a learner that builds its policy for another layout)
makes the learner's first-iteration scores differ from the actor's; with ``learner.max_staleness=0`` every batch
is on-policy, so the PPO ratio of the first optimiser step must be exactly 1 and the approximate KL 0 (the learner
logs them as ``policy/first_ratio_max`` and ``policy/first_approx_kl``). The evaluation task then loads the same
checkpoint with the broadcast weights and evaluates the policy beside a baseline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cacovid_rl.config import Config, load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 2  # two updates: version 1 is rolled out with weights the learner broadcast after its first update
RETENTIONS = (0.25, 0.5)


@pytest.fixture(scope="module")
def qwen_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Qwen2.5-VL checkpoint on disk (what ``model.path`` names) and a few synthetic videos.

    The checkpoint answers with an option letter that depends on the kept tokens (``tiny.video_sensitive``), and
    every question is multiple choice: a question's rewards then differ between keep sets, so the learner takes
    real optimiser steps and version 1's weights differ from version 0's (otherwise the broadcast is untested)."""
    from cacovid_rl.data.synthetic import make_synthetic
    from cacovid_rl.models.tiny import save_tiny_qwen2_5_vl

    ckpt = save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen"), seed=0)
    data = tmp_path_factory.mktemp("qwen_data")
    make_synthetic(data, n=12, seed=5, fractions=(0.5, 0.0, 0.5), numerical_fraction=0.0)  # 6 train, 6 held out
    return ckpt, data


def _cfg(out: Path, ckpt: Path, data: Path) -> Config:
    return load_config(
        None,
        [
            f"model.path={ckpt}",
            "model.family=qwen2_5_vl",  # fails loudly if the checkpoint were another family
            "model.max_new_tokens=1",  # a bare option letter
            f"data.train_path={data / 'train.json'}",
            f"data.eval_path={data / 'test.json'}",
            f"data.video_root={data}",
            "data.num_frames=4",  # 2 temporal patches of 2 frames, 16 merged tokens each
            "sampling.num_content=1",
            "sampling.num_token=3",
            "sampling.num_frame=1",
            "sampling.rate=0.25",
            "rollout.iterations=2",
            "learner.lr=1e-3",
            f"learner.total_steps={STEPS}",
            "learner.questions_per_step=2",
            "learner.max_staleness=0",  # every batch on-policy: the first-iteration ratio must be exactly 1
            f"learner.checkpoint_every={STEPS}",
            f"learner.checkpoint_dir={out / 'ckpt'}",
            "cluster.min_actors=1",
            "cluster.max_actors=1",
            "cluster.num_cpus=2",
            "cluster.object_store_memory_mb=200",
            "cluster.call_timeout_s=120",
            f"eval.every_steps={STEPS}",  # one evaluation, of the final (broadcast) weights
            "eval.max_samples=2",
            f"eval.retentions=[{', '.join(map(str, RETENTIONS))}]",
            "eval.baselines=[uniform]",
            "wandb.mode=disabled",
            f"output_dir={out}",
        ],
    )


def test_trajectory_carries_3d_mrope_positions(qwen_setup: tuple[Path, Path], tmp_path: Path) -> None:
    """One rollout in this process: what a Qwen reward actor sends the learner holds ``[3, L]`` positions whose
    video columns differ between the rows (time, height, width), not 1-D ids repeated three times."""
    from cacovid_rl.data.records import load_records
    from cacovid_rl.rl.trajectory import Trajectory
    from cacovid_rl.rl.worker import RewardWorker, WorkItem

    ckpt, data = qwen_setup
    cfg = _cfg(tmp_path, ckpt, data)
    worker = RewardWorker(cfg)
    assert worker.adapter.family == "qwen2_5_vl"
    rec = load_records(cfg.data.train_path, cfg.data.video_root).records[0]
    status, payload = worker.run(WorkItem(0, 0, 0, WorkItem.record_to_dict(rec)))
    assert status.status == "ok", status
    traj = Trajectory.from_bytes(payload)
    pos = np.asarray(traj.position_ids)
    assert pos.ndim == 2 and pos.shape[0] == 3, pos.shape
    assert pos.shape[1] == np.asarray(traj.inputs_embeds).shape[-2]
    video = pos[:, traj.video_start : traj.video_start + traj.num_frames * traj.tokens_per_frame]
    assert video.shape[1] == 2 * 16  # 4 frames -> 2 temporal patches x 4 x 4 merged tokens
    # Height and width ids of a 4 x 4 grid repeat per temporal patch; the time ids step once per patch.
    assert not np.array_equal(video[1], video[2]) and not np.array_equal(video[0], video[1])
    assert len(np.unique(video[0])) == 2 and len(np.unique(video[1])) == 4 and len(np.unique(video[2])) == 4


def test_qwen_debug_training_and_evaluation_through_the_driver(qwen_setup: tuple[Path, Path], tmp_path: Path) -> None:
    """``learner.driver.train`` on a fresh local Ray: rollouts by a Qwen reward actor, learner updates that
    recompute the actor's scores exactly (ratio 1, KL 0 at each update's first step), the new weights broadcast to
    the actor and to the evaluation task, and an evaluation of the final policy beside the uniform baseline."""
    from learner.driver import train

    ckpt, data = qwen_setup
    cfg = _cfg(tmp_path, ckpt, data)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback; train() starts (and stops) a local instance
    summary = train(cfg)

    assert summary["version"] == STEPS
    assert sorted(summary["counters"]["consumed_indices"]) == list(range(STEPS * cfg.learner.questions_per_step))
    assert summary["counters"]["skipped"] == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in updates] == list(range(1, STEPS + 1))
    for r in updates:
        assert r["learner/stale_trajectories"] == 0, r
        # The learner's recomputed first-iteration scores are the actor's: ratio 1 and KL 0 (both exact on this
        # CPU run; the bounds allow a few float32 ulps). Recomputing with 1-D positions instead of the shipped
        # M-RoPE ids gives a ratio of 1 + 4e-5 and a KL of 1e-8 here, an actor that kept version 0 more.
        assert r["policy/first_ratio_max"] == pytest.approx(1.0, abs=2e-6), r
        assert abs(r["policy/first_approx_kl"]) < 1e-10, r
        assert np.isfinite(r["loss/total"]), r
    # The first update really moved the weights (a non-zero gradient, not every step skipped for lack of signal),
    # so the second batch was rolled out with new broadcast weights: an actor that kept version 0 fails above.
    first = updates[0]
    assert first["policy/grad_norm"] > 0 and first["learner/skipped_steps"] < first["learner/optimizer_steps"], first
    # Both families' checkpoints go through the same save: the policy is what the evaluation loaded.
    assert (Path(summary["policy_dir"])).is_dir() and Path(summary["checkpoint"]).is_dir()

    result = json.loads((tmp_path / "eval" / f"eval_v{STEPS:06d}.json").read_text())
    assert result["version"] == STEPS
    assert result["skipped"] == 0, result["errors"]
    assert result["n"] == cfg.eval.max_samples
    assert result["counts"] == {"cacovid": cfg.eval.max_samples, "uniform": cfg.eval.max_samples}
    assert set(result["methods"]) == {"cacovid", "uniform"}
    for per in result["methods"].values():
        assert sorted(map(float, per)) == list(RETENTIONS)
