"""Checkpoints that verify, fall back and prune only their own run, and metrics that do not repeat steps.

Ray-free: ``save_checkpoint``/``find_resumable`` on a real tiny policy, the driver's resume decision and its
checkpoint-failure policy with the Ray call replaced.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from cacovid_rl.config import load_config
from cacovid_rl.models.tiny import tiny_llava_onevision
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.rl.update import PolicyUpdater
from learner.checkpoint import (
    CheckpointError,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

CFG = load_config(None, ["learner.total_steps=10", "rollout.iterations=1"])


@pytest.fixture(scope="module")
def updater() -> PolicyUpdater:
    torch.manual_seed(0)
    return PolicyUpdater(CacovidPolicy.from_adapter(tiny_llava_onevision(0)), CFG.learner, CFG.loss, 1)


def _save(root: Path, step: int, up: PolicyUpdater, run_id: str, keep: int = 2, config: dict | None = None) -> Path:
    state = {"version": step, "run_id": run_id, "config": config or CFG.to_dict()}
    return save_checkpoint(root, step, up.policy, up.optimizer_state(), up.scheduler, state, keep=keep)


def test_corrupt_newest_checkpoint_falls_back_to_the_intact_one(tmp_path: Path, updater, caplog) -> None:
    _save(tmp_path, 1, updater, "run-a")
    newest = _save(tmp_path, 2, updater, "run-a")
    weights = newest / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: safetensors would still load it, silently wrong
    weights.write_bytes(bytes(data))
    assert "model.safetensors" in (verify_checkpoint(newest) or "")
    path, skipped = find_resumable(tmp_path)
    assert path == tmp_path / "step_00000001"
    assert skipped and skipped[0][0] == "step_00000002" and "model.safetensors" in skipped[0][1]


def test_unreadable_checkpoint_file_names_itself(tmp_path: Path, updater) -> None:
    path = _save(tmp_path, 1, updater, "run-a")
    (path / "optimizer.safetensors").write_bytes(b"garbage")
    fresh = PolicyUpdater(CacovidPolicy.from_adapter(tiny_llava_onevision(0)), CFG.learner, CFG.loss, 1)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors"):
        load_checkpoint(path, fresh.policy, fresh.scheduler)


def test_new_run_beside_a_previous_runs_higher_steps_keeps_its_own_checkpoints(tmp_path: Path, updater) -> None:
    old = [_save(tmp_path, s, updater, "previous", keep=5) for s in (100, 200)]
    for step in (1, 2, 3):
        _save(tmp_path, step, updater, "current", keep=2)
    names = sorted(p.name for p in tmp_path.glob("step_*"))
    # Another run's higher step numbers must not count: keeping "the newest 2 names" would delete each new one.
    assert names == ["step_00000002", "step_00000003", "step_00000100", "step_00000200"]
    assert all(p.is_dir() for p in old)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000003"
    path, _ = find_resumable(tmp_path)
    assert path == tmp_path / "step_00000003"


def test_resume_without_a_usable_checkpoint_is_an_error_unless_asked_to_start(tmp_path: Path, updater) -> None:
    from learner.resume import ResumeError, resume_point

    cfg = CFG.replace(**{"learner.checkpoint_dir": str(tmp_path)})
    with pytest.raises(ResumeError, match="--resume-or-start"):  # empty dir: never a silent fresh start
        resume_point(cfg, tmp_path, True, False, False)
    (tmp_path / "LATEST").write_text("step_00000042\n")  # dangling pointer
    with pytest.raises(ResumeError, match="no verified checkpoint"):
        resume_point(cfg, tmp_path, True, False, False)
    path, run_id = resume_point(cfg, tmp_path, True, True, False)
    assert path is None and run_id


def test_resume_refuses_a_changed_run_definition(tmp_path: Path, updater) -> None:
    from learner.resume import ResumeError, resume_point

    _save(tmp_path, 1, updater, "run-a")
    same = CFG.replace(**{"learner.total_steps": 20})  # extending a run is fine
    assert resume_point(same, tmp_path, True, False, False) == (tmp_path / "step_00000001", "run-a")
    for key, value in (("seed", 7), ("learner.questions_per_step", 4)):
        with pytest.raises(ResumeError, match=key.replace(".", r"\.")):
            resume_point(CFG.replace(**{key: value}), tmp_path, True, False, False)
    assert resume_point(CFG.replace(seed=7), tmp_path, True, False, True)[0] == tmp_path / "step_00000001"


def test_failed_periodic_save_warns_and_the_final_one_fails_loudly(tmp_path: Path, monkeypatch, caplog) -> None:
    import learner.driver as driver

    class _Learner:
        class save:
            @staticmethod
            def remote(root, state):
                return "ref"

    def failing_get(ref, timeout=None):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(driver.ray, "get", failing_get)
    counters = driver.Counters()
    metrics = type("M", (), {"wandb_step": None})()
    with caplog.at_level(logging.WARNING, logger="cacovid_rl.driver"):
        ok = driver._checkpoint(_Learner, CFG, 5, counters, tmp_path, "r", metrics, must=False)
    assert ok is False and counters.checkpoint_failures == 1 and "retrying" in caplog.text
    with pytest.raises(CheckpointError, match="Read-only"):
        driver._checkpoint(_Learner, CFG, 6, counters, tmp_path, "r", metrics, must=True)


def test_resumed_metrics_are_cut_back_to_the_checkpoint(tmp_path: Path) -> None:
    from learner.metrics import MetricsLogger

    cfg = load_config(None, ["wandb.mode=disabled"])
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    logger = MetricsLogger(cfg, tmp_path, resume_step=5, resumed=True)  # SIGKILL after update 7, checkpoint at 5
    logger.log({"loss": 6.0}, step=6)
    logger.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    fresh = MetricsLogger(cfg, tmp_path)  # a new run in the same dir keeps the old metrics aside
    fresh.close()
    assert not path.exists() and (tmp_path / "metrics.jsonl.prev1").is_file()
