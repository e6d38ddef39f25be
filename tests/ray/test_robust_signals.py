"""A SIGTERM to the driver's whole process group keeps the stop checkpoint, on the real CLI and Ray.

``timeout``, supervisors and ``kill -- -PGID`` signal the group. A local raylet in that group would die while the
driver saves its stop checkpoint (``learner/ray_runtime.py`` starts it in its own session), and an interrupted run
must not exit 0 like a finished one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from learner.checkpoint import find_resumable, step_of
from tests.ray.conftest import make_cfg, read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_sigterm_to_the_process_group_checkpoints_and_exits_143(tmp_path: Path, synthetic_dir: Path) -> None:
    out = tmp_path / "run"
    cfg = make_cfg(out, synthetic_dir, "learner.total_steps=40", "learner.checkpoint_every=1000")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cacovid_cli", "train", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as under `timeout` or a supervisor
    )
    try:
        deadline = time.monotonic() + 300
        while len(read_metrics(out)) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no updates within 300 s"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: the driver and whatever shares its group
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr[-3000:])
    path, passed = find_resumable(out / "ckpt")
    assert path is not None and not passed, passed
    assert step_of(path) >= 2 and step_of(path) == read_metrics(out)[-1]["step"]
    assert "stopped by signal 15" in stderr and str(path) in stderr
