"""Poison records on the real debug mode (local Ray, the shipped tiny model): training ends, nothing loops.

The failures are injected inside the reward actors by Ray's ``worker_process_setup_hook`` (the patch is installed in
every worker process, restarted ones included), keyed by the video a record names, at the point where a real
record fails: frame decoding, inside the item's own code. The cases are the ways a record can stall a run: an
exception of an unexpected type (the tokenizer's TypeError on a lone surrogate) must be a skip, not a task error that
is re-dispatched forever, and an item that hangs or kills its actor must be quarantined after its strikes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.ray.conftest import BackgroundRun, make_cfg, read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]

POISON = {"raise": "poison_raise.mp4", "hang": "poison_hang.mp4", "kill": "poison_kill.mp4"}


def make_poison_hook(poison: dict[str, str]):
    """Setup hook run in each Ray worker: make ``read_frames`` fail as the named poison video asks.

    A closure, so Ray ships it by value: workers cannot import this test module by name (another ``tests`` package
    is installed in site-packages).
    """

    def install_poison() -> None:
        import os
        import time
        from pathlib import Path

        import cacovid_rl.rl.worker as worker

        real = worker.read_frames

        def poisoned(path, *args, **kwargs):
            name = Path(path).name
            if name == poison["raise"]:
                raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
            if name == poison["hang"]:
                time.sleep(3600)
            if name == poison["kill"]:
                os._exit(1)
            return real(path, *args, **kwargs)

        worker.read_frames = poisoned

    return install_poison


@pytest.fixture
def poisoned_ray():
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": make_poison_hook(dict(POISON))},
    )
    yield ray
    ray.shutdown()


def _poison_data(synthetic_dir: Path, out: Path, seed: int) -> tuple[Path, dict[str, str]]:
    """A copy of the data whose first four questions in the seeded order are poison; returns their sample ids."""
    from cacovid_rl.data.records import load_records

    data = out / "data"
    shutil.copytree(synthetic_dir, data)
    raw = json.loads((data / "train.json").read_text())
    n = len(load_records(data / "train.json", data).records)
    assert n == len(raw)
    order = np.random.default_rng([seed, 0]).permutation(n)  # DataCursor's epoch-0 order
    ids: dict[str, str] = {}
    for kind, pos in zip(("raise", "hang", "kill"), order[:3], strict=True):
        rec = raw[int(pos)]
        video = Path(rec["video"])
        shutil.copy(data / video, data / video.with_name(POISON[kind]))
        rec["video"] = str(video.with_name(POISON[kind]))
        ids[kind] = str(rec.get("problem_id", pos))
    long = raw[int(order[3])]
    long["problem"] = "How many dots ? " * 7000  # ~100,000 characters
    ids["long"] = str(long.get("problem_id", order[3]))
    # Skipped at load (lone surrogate), appended so the loaded records and their order are unchanged.
    raw.append({**raw[int(order[4])], "problem": "What colour \udcff box ?", "problem_id": "surrogate"})
    (data / "train.json").write_text(json.dumps(raw))
    return data, ids


def test_poison_items_are_skipped_or_quarantined_and_training_finishes(
    poisoned_ray, tmp_path: Path, synthetic_dir: Path
) -> None:
    cfg = make_cfg(
        tmp_path / "run",
        synthetic_dir,
        "learner.total_steps=2",
        "learner.questions_per_step=4",
        "cluster.call_timeout_s=20",
        "cluster.max_restarts=10",
        "cluster.max_item_failures=2",
        "model.max_prompt_tokens=256",
    )
    data, ids = _poison_data(synthetic_dir, tmp_path, cfg.seed)
    cfg = cfg.replace(**{"data.train_path": str(data / "train.json"), "data.video_root": str(data)})
    run = BackgroundRun(cfg)
    summary = run.join(timeout=540)  # a run that re-dispatched a poison item forever would never get here
    counters = summary["counters"]
    assert summary["version"] == 2
    assert sorted(counters["consumed_indices"]) == list(range(8)), "every question of the run is accounted for"
    assert sorted(summary["quarantined"]) == sorted([ids["hang"], ids["kill"]]), summary["quarantined"]
    assert summary["skipped"]["quarantined"] == 2
    assert summary["skipped"]["item_error"] == 1  # the TypeError, skipped on its first try
    assert summary["skipped"]["prompt_too_long"] == 1
    assert summary["load_skipped"] == {"invalid_text": 1}
    # Bounded: each of the two bad calls tried max_item_failures times; the raising item once.
    assert counters["hung_restarts"] >= 2 and counters["actor_failures"] >= 2
    assert counters["redispatched"] <= 20, counters
    last = read_metrics(tmp_path / "run")[-1]
    assert last["data/quarantined"] == 2 and last["data/load_skipped/invalid_text"] == 1
