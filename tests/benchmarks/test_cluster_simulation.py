"""The cluster simulation's model on cases with known answers, and its committed figure (no Ray, seconds).

The real validation runs are the benchmark's own job (``python -m benchmarks.cluster_simulation``); here the event
model is checked against closed forms: reward-bound, learner-bound, window-bound, processor sharing, data
parallelism and the broadcast's pull rounds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.cluster_simulation import (
    DRIVER_OVERHEAD_S,
    Costs,
    CpuSampler,
    Setup,
    broadcast_time,
    flop_costs_7b,
    from_run_costs,
    simulate,
    update_time,
)

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def costs(**kw) -> Costs:
    base = dict(name="t", reward_s=1.0, reward_cv=0.0, decode_s=0.0, learner_s=1e-4, iterations=5, grad_bytes=0.0,
                bytes_per_question=0.0, weight_bytes=0.0, publish_s=0.0, sync_s=0.0, source="test")  # fmt: skip
    base.update(kw)
    return Costs(**base)


def test_reward_bound_pipeline_runs_every_actor_flat_out():
    r = simulate(costs(), Setup(actors=8, learners=1, questions_per_step=8, max_staleness=2), updates=40)
    assert r["questions_per_s"] == pytest.approx(8.0, rel=0.02)
    assert r["reward_utilisation"] > 0.97 and r["bottleneck"] == "reward actors"


def test_learner_bound_pipeline_runs_at_the_learners_pace_and_more_learners_help():
    c = costs(reward_s=0.01, learner_s=0.5)
    one = simulate(c, Setup(actors=8, learners=1, questions_per_step=8, max_staleness=2), updates=30)
    assert one["questions_per_s"] == pytest.approx(8 / (8 * 0.5), rel=0.02)
    assert one["bottleneck"] == "learner compute" and one["learner_utilisation"] > 0.97
    four = simulate(c, Setup(actors=8, learners=4, questions_per_step=8, max_staleness=2), updates=30)
    assert four["questions_per_s"] == pytest.approx(4 * one["questions_per_s"], rel=0.02)


def test_a_closed_window_serialises_rollout_and_update():
    # On-policy with one question per step: the actor waits for every update and the learner for every question.
    c = costs(reward_s=1.0, learner_s=1.0)
    r = simulate(c, Setup(actors=4, learners=1, questions_per_step=1, max_staleness=0), updates=20)
    assert r["questions_per_s"] == pytest.approx(0.5, rel=0.02)
    assert r["bottleneck"] == "staleness window"


def test_processor_sharing_on_few_cores():
    r = simulate(costs(), Setup(actors=4, questions_per_step=8, max_staleness=2, cores=2.0), updates=30)
    assert r["questions_per_s"] == pytest.approx(2.0, rel=0.03)  # 4 actors on 2 cores: half speed each
    assert r["bottleneck"] == "cpu cores"


def test_cores_taken_outside_the_pipeline_and_the_calibration_share():
    # 4 actors share the 2 - 1 = 1 core the others left: 0.25 core each, 1 s of work per question at a full core.
    r = simulate(costs(), Setup(actors=4, questions_per_step=8, max_staleness=2, cores=2.0, reserved_cores=1.0),
                 updates=30)  # fmt: skip
    assert r["questions_per_s"] == pytest.approx(1.0, rel=0.03)
    # Costs measured with half a core ran at half speed: at a full core's share each question takes 0.5 s.
    r = simulate(costs(), Setup(actors=1, questions_per_step=8, max_staleness=2, cores=2.0, calibration_share=0.5),
                 updates=30)  # fmt: skip
    assert r["questions_per_s"] == pytest.approx(2.0, rel=0.03)


def test_from_run_costs_count_the_publish_once():
    # A learner-bound run: its learner time per question (0.25 s) already includes the publish, so an update of 4
    # questions takes 1 s + the driver overhead, whatever the in-process publish cost was.
    base = costs(publish_s=0.4)
    real = {"run_reward_s": 0.01, "run_learner_s": 0.25, "run_sync_load_s": 0.0}
    r = simulate(from_run_costs(base, real), Setup(actors=4, questions_per_step=4, max_staleness=2), updates=30)
    assert r["questions_per_s"] == pytest.approx(4 / (1.0 + DRIVER_OVERHEAD_S), rel=0.02)


def test_cpu_sampler_splits_cores_by_process_class(tmp_path: Path):
    sampler = CpuSampler(tmp_path / "metrics.jsonl")  # not started: snapshots set by hand
    sampler.snapshots = {
        0: {"t": 0.0, "machine_busy_s": 0.0, "procs": {1: ("driver", 0.0), 2: ("workers", 0.0), 9: ("workers", 1.0)}},
        2: {"t": 5.0, "machine_busy_s": 6.0, "procs": {1: ("driver", 1.0), 2: ("workers", 4.0)}},
        4: {"t": 10.0, "machine_busy_s": 15.0,
            "procs": {1: ("driver", 2.0), 2: ("workers", 8.0), 3: ("ray_runtime", 1.0)}},
    }  # fmt: skip
    c = sampler.cores(1, 4)  # no snapshot at line 1: the window starts at the one before it (line 0)
    assert c["window_s"] == 10.0
    assert c["driver"] == pytest.approx(0.2) and c["workers"] == pytest.approx(0.8)
    assert c["ray_runtime"] == pytest.approx(0.1)  # started inside the window: counted from 0
    assert c["machine"] == pytest.approx(1.5) and c["others"] == pytest.approx(1.5 - 1.1)
    assert sampler.cores(2, 4)["workers"] == pytest.approx(4.0 / 5.0)


def test_prefetch_hides_the_decode():
    c = costs(decode_s=0.3)
    off = simulate(c, Setup(actors=2, questions_per_step=4, max_staleness=2, prefetch=False), updates=30)
    on = simulate(c, Setup(actors=2, questions_per_step=4, max_staleness=2, prefetch=True), updates=30)
    assert off["questions_per_s"] == pytest.approx(2 / 1.3, rel=0.02)
    assert on["questions_per_s"] == pytest.approx(2.0, rel=0.02)


def test_update_and_broadcast_costs():
    c = costs(grad_bytes=1e9, bytes_per_question=1e8, weight_bytes=1e9, publish_s=0.1)
    u = update_time(c, Setup(actors=8, learners=4, questions_per_step=8, allreduce_Bps=1e11, learner_nic_Bps=1e10))
    assert u["compute"] == pytest.approx(2e-4)
    assert u["fetch"] == pytest.approx(2 * 4 * 1e8 / 1e10)  # 4 ranks on one node share its network
    assert u["allreduce"] == pytest.approx(5 * 2 * 3 / 4 * 1e9 / 1e11)
    assert u["publish"] == 0.1
    assert broadcast_time(c, Setup(actors=8, pull_Bps=1e9)) == pytest.approx(1.0)  # 1 node: one pull
    assert broadcast_time(c, Setup(actors=512, pull_Bps=1e9)) == pytest.approx(7.0)  # 64 nodes: 7 rounds


def test_seven_b_costs_are_in_the_issues_range():
    c = flop_costs_7b()
    assert 0.5 < c.reward_s < 10 and 0.1 < c.learner_s < 2
    assert c.bytes_per_question == pytest.approx(45.7e6, rel=0.05)  # issue 18: 45.7 MB per trajectory


@pytest.mark.skipif(not (RESULTS / "cluster_simulation.json").is_file(), reason="no committed result")
def test_committed_result_redraws(tmp_path: Path):
    from benchmarks import cluster_simulation

    shutil.copy(RESULTS / "cluster_simulation.json", tmp_path / "cluster_simulation.json")
    res = cluster_simulation.main(["--plot-only", "--out", str(tmp_path / "cluster_simulation.json")])
    assert (tmp_path / "cluster_simulation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["validation"] and set(res["sweep"]["prefetch"]) == {
        f"{a}x{w}" for a in cluster_simulation.REWARD_GPUS for w in cluster_simulation.LEARNERS
    }
