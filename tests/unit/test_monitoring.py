"""Monitoring a user can act on: head entropies, device readings, the cluster aggregation, the learner's readings,
the reward actor's status and the sample-answer table read back from a real offline wandb run."""

from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cacovid_rl.config import LossConfig, load_config
from cacovid_rl.device_stats import GB, DeviceMonitor, peak_rss_bytes, rss_bytes
from cacovid_rl.rl.loss import bernoulli_entropy, cacovid_loss
from cacovid_rl.rl.worker import ActorReport, RolloutStatus, WorkItem
from cacovid_rl.types import MODE_FRAME, MODE_TOKEN, PolicyScores
from learner.monitoring import SAMPLE_COLUMNS, ClusterMonitor, learner_metrics, log_samples
from tests.wandb_io import read_offline_records

# ---------------------------------------------------------------------------------------------------------------------
# entropy of the heads


def _h(p: float) -> float:
    """Bernoulli entropy in nats, by the definition."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_bernoulli_entropy_matches_the_definition_and_stays_finite() -> None:
    s = torch.tensor([0.0, math.log(3.0), -math.log(3.0), 2.0, 60.0, -60.0, 1e4])
    h = bernoulli_entropy(s)
    assert h[0].item() == pytest.approx(math.log(2.0))
    assert h[1].item() == pytest.approx(_h(0.75)) and h[2].item() == pytest.approx(_h(0.25))
    assert h[3].item() == pytest.approx(_h(1 / (1 + math.exp(-2.0))), rel=1e-6)
    assert torch.isfinite(h).all() and (h >= 0).all() and h[4:].max().item() < 1e-20  # certain: 0, never NaN


def test_loss_reports_mean_head_entropies_without_changing_the_loss() -> None:
    token = torch.tensor([[0.0, math.log(3.0)], [-math.log(3.0), 40.0]], requires_grad=True)
    frame = torch.tensor([0.0, 2.0], requires_grad=True)
    new = PolicyScores(token, frame)
    old = PolicyScores(token.detach().clone(), frame.detach().clone())
    keep = [torch.tensor([0, 3]), torch.tensor([1]), torch.tensor([2, 3])]
    modes = torch.tensor([MODE_TOKEN, MODE_TOKEN, MODE_FRAME])
    rewards = torch.tensor([1.0, 0.0, 1.0])
    cfg = LossConfig()
    out = cacovid_loss(new, old, keep, modes, rewards, cfg)
    token_h = (math.log(2.0) + _h(0.75) + _h(0.25) + 0.0) / 4  # 40 is certain to float precision
    frame_h = (math.log(2.0) + _h(1 / (1 + math.exp(-2.0)))) / 2
    assert out.metrics["policy/token_entropy"] == pytest.approx(token_h, rel=1e-6)
    assert out.metrics["policy/frame_entropy"] == pytest.approx(frame_h, rel=1e-6)
    # Metrics only: the loss value is tests/unit/test_golden_loss.py's (the official one), which still passes.


# ---------------------------------------------------------------------------------------------------------------------
# device readings


def test_cpu_monitor_reads_rss_peak_and_cpu_time() -> None:
    m = DeviceMonitor("cpu")
    # Earlier tests in this process may have left the peak far above today's RSS, so a 200 MB block would not move
    # it: start from a peak that is the current RSS.
    m.reset_peak()
    first = m.stats()
    assert first["on_gpu"] == 0.0 and first["rss_gb"] > 0.01 and first["peak_gb"] >= first["mem_gb"] > 0
    assert first["rss_gb"] == pytest.approx(rss_bytes() / GB, rel=0.05)
    block = np.ones(200_000_000 // 8)  # 200 MB, touched: resident
    grown = m.stats()
    assert grown["rss_peak_gb"] - first["rss_peak_gb"] > 0.15 and grown["rss_peak_gb"] >= grown["rss_gb"]
    del block
    m.reset_peak()
    assert peak_rss_bytes() / GB < grown["rss_peak_gb"] - 0.15  # the freed block no longer counts
    time.sleep(0.5)
    idle = m.stats()["cpu_util"]
    wall0, cpu0 = time.monotonic(), time.process_time()
    while time.process_time() - cpu0 < 0.3:  # 0.3 s of CPU on this thread
        pass
    busy = m.stats()["cpu_util"]
    wall = time.monotonic() - wall0  # at least the window the reading covers, however busy the machine is
    assert idle < 0.3 and 0.3 / wall <= busy <= 1.5  # one thread spun (the 1.5: other threads of pytest)
    assert "gpu_util" not in m.stats() and "total_gb" not in m.stats()


def test_gpu_monitor_reports_torch_allocator_peaks_and_asks_nvml_once(monkeypatch) -> None:
    """The GPU branch against stubbed allocator counters (a real card: test_monitoring_gpu_real_card)."""
    vals = {"alloc": 1e9, "peak": 3e9, "res": 2e9, "res_peak": 4e9, "total": 80e9}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: vals["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: vals["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: vals["res"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda i: vals["res_peak"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=vals["total"]))
    calls = []

    def no_nvml(i):
        calls.append(i)
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    m = DeviceMonitor("cpu")
    m.on_gpu, m.index, m._nvml_ok = True, 0, True
    s = m.stats()
    assert (s["allocated_gb"], s["allocated_peak_gb"], s["reserved_gb"], s["reserved_peak_gb"]) == (1, 3, 2, 4)
    assert s["peak_gb"] == 4 and s["mem_gb"] == 2 and s["total_gb"] == 80 and s["peak_frac"] == pytest.approx(0.05)
    assert "gpu_util" not in s and m.stats() and calls == [0]  # asked once
    monkeypatch.setattr(torch.cuda, "utilization", lambda i: 37)
    m._nvml_ok = True
    assert m.stats()["gpu_util"] == pytest.approx(0.37)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_monitoring_gpu_real_card() -> None:
    m = DeviceMonitor("cuda")
    m.reset_peak()
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 268 MB
    s = m.stats()
    assert s["on_gpu"] == 1.0 and s["allocated_peak_gb"] >= s["allocated_gb"] >= 0.268
    assert s["reserved_peak_gb"] >= s["reserved_gb"] >= s["allocated_gb"] and 0 < s["peak_frac"] < 1
    del x
    torch.cuda.empty_cache()
    assert m.stats()["allocated_peak_gb"] >= 0.268  # the peak outlives the tensor


# ---------------------------------------------------------------------------------------------------------------------
# cluster aggregation


def _status(
    aid: str, combos: int, items: int, busy: float, started: float = 100.0, peak: float = 1.0, **kw
) -> RolloutStatus:
    report = ActorReport(
        node_id="n",
        pid=7,
        actor_started=started,
        version=0,
        weights_checksum="x",
        busy_s=busy,
        alive_s=kw.get("alive", 100.0),
        synced=False,
        sync_latency_s=kw.get("latency", 0.5),
        sync_load_s=0.01,
        totals={"items": items, "combos": combos, "video_tokens": 128 * items, "kept_tokens": 8 * combos},
        device=kw.get(
            "device", {"on_gpu": 0.0, "peak_gb": peak, "mem_gb": peak / 2, "rss_gb": peak / 2, "cpu_util": 0.9}
        ),
    )
    return RolloutStatus(
        0, 0, "s", aid, 0, "ok", combos=28, elapsed_s=2.0, timings={"score": 1.5, "encode": 0.25}, actor=report
    )


def test_cluster_metrics_rates_spread_restarts_and_removed_actors() -> None:
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    mon = ClusterMonitor(clock=lambda: next(clock))
    stats = {"a": _status("a", 40, 2, 4.0, peak=3.0), "b": _status("b", 10, 1, 1.0, latency=2.5)}
    m = mon.metrics(stats)
    assert m["perf/combos_per_s"] == pytest.approx(5.0)  # (40 + 10) / 10 s
    assert m["perf/questions_per_s"] == pytest.approx(0.3)
    assert m["perf/video_tokens_per_s"] == pytest.approx(128 * 3 / 10)
    assert m["perf/kept_tokens_per_s"] == pytest.approx(8 * 50 / 10)
    assert (m["perf/actor_combos_per_s_min"], m["perf/actor_combos_per_s_max"]) == (1.0, 4.0)
    assert (m["perf/actor_busy_min"], m["perf/actor_busy_max"]) == (0.1, 0.4)
    assert m["perf/actor_busy_mean"] == pytest.approx(0.25)
    assert (m["mem/actor_peak_gb_min"], m["mem/actor_peak_gb_max"]) == (1.0, 3.0)
    assert m["perf/actor_cpu_util_max"] == 0.9 and m["sync/latency_s_max"] == 2.5
    assert m["perf/actors_reporting"] == 2.0 and "perf/actor_gpu_util_max" not in m
    # The names and values the driver logged before (its _actor_metrics) continue unchanged.
    assert m["perf/actor_utilisation"] == pytest.approx((4 + 1) / 2 / 100) and m["sync/latency_s"] == pytest.approx(1.5)
    assert m["perf/combos_per_s_per_actor"] == pytest.approx(14.0) and m["timing/score"] == 1.5

    # Next window: a's work grows by 20 combos; b stalls (0: the straggler shows as the min).
    stats["a"] = _status("a", 60, 3, 6.0)
    m = mon.metrics(stats)
    assert m["perf/combos_per_s"] == pytest.approx(2.0) and m["perf/actor_combos_per_s_min"] == 0.0

    # a restarts under the same id (new process, counters from 0); c was removed from the pool and must not count.
    stats["a"] = _status("a", 5, 1, 1.0, started=200.0)
    stats["c"] = _status("c", 999, 99, 9.0)
    m = mon.metrics(stats, live={"a", "b"})
    assert m["perf/combos_per_s"] == pytest.approx(0.5)  # a's 5 new combinations, not 5 - 60
    assert m["perf/actors_reporting"] == 2.0
    assert mon.metrics({}) == {}
    assert mon.metrics(stats, live=set()) == {"perf/actors_reporting": 0.0}  # the pool is empty right now


def test_first_window_leaves_out_the_start_up_wait() -> None:
    """60 s since the monitor was made, but the actors only became ready 5 and 4 s ago (model loading)."""
    mon = ClusterMonitor(clock=iter([0.0, 60.0, 70.0]).__next__)
    stats = {"a": _status("a", 20, 1, 2.5, alive=5.0), "b": _status("b", 10, 1, 2.0, alive=4.0)}
    m = mon.metrics(stats)
    assert m["perf/combos_per_s"] == pytest.approx(30 / 5) and m["perf/actor_busy_max"] == pytest.approx(0.5)
    stats["a"] = _status("a", 40, 2, 5.0, alive=15.0)
    assert mon.metrics(stats)["perf/combos_per_s"] == pytest.approx(20 / 10)  # later windows: the clock


def test_cluster_metrics_leave_out_statuses_without_an_actor_report_and_empty_device_readings() -> None:
    quarantined = RolloutStatus.quarantined(WorkItem(3, 0, 0, {"problem_id": "q"}), "hung twice")
    m = ClusterMonitor(clock=iter([0.0, 1.0]).__next__).metrics(
        {"a": _status("a", 10, 1, 1.0, device={}), "q": quarantined}
    )
    assert "mem/actor_peak_gb_max" not in m and m["perf/actors_reporting"] == 1.0
    assert m["perf/combos_per_s"] == pytest.approx(10.0) and m["perf/actor_utilisation"] == pytest.approx(0.01)


def test_learner_metrics_names_and_busy_share() -> None:
    cpu = {"on_gpu": 0.0, "peak_gb": 2.0, "mem_gb": 1.5, "rss_gb": 1.5, "cpu_util": 0.8}
    m = learner_metrics(cpu, busy_s=2.0, wall_s=8.0, combos=280)
    assert m == {
        "mem/learner_peak_gb": 2.0,
        "mem/learner_mem_gb": 1.5,
        "mem/learner_rss_gb": 1.5,
        "perf/learner_cpu_util": 0.8,
        "perf/learner_busy": 0.25,
        "perf/learner_combos_per_s": 140.0,
    }
    gpu = {**cpu, "on_gpu": 1.0, "allocated_peak_gb": 1.2, "peak_frac": 0.03, "gpu_util": 0.6}
    m = learner_metrics(gpu, busy_s=2.0, wall_s=1.0, combos=0)
    assert m["perf/learner_busy"] == 1.0 and m["mem/learner_peak_frac"] == 0.03 and m["perf/learner_gpu_util"] == 0.6
    assert m["mem/learner_allocated_peak_gb"] == 1.2


# ---------------------------------------------------------------------------------------------------------------------
# with the shipped tiny model: the actor's status, the learner's readings, the sample table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from cacovid_rl.data.records import load_records
    from cacovid_rl.data.synthetic import make_synthetic

    data = tmp_path_factory.mktemp("monitoring_data")
    make_synthetic(data, n=6, seed=4, fractions=(0.0, 0.0, 1.0))
    cfg = load_config(
        None,
        [
            "model.path=tiny",
            f"data.train_path={data / 'test.json'}",
            f"data.eval_path={data / 'test.json'}",
            f"data.video_root={data}",
            "data.num_frames=8",
            "model.max_new_tokens=4",
            "sampling.num_content=1",
            "sampling.num_token=3",
            "sampling.num_frame=1",
            "rollout.iterations=2",
            "eval.retentions=[0.1,0.5]",
            "wandb.mode=offline",
            "wandb.project=test",
        ],
    )
    return cfg, load_records(data / "test.json", data).records


def test_reward_actor_status_carries_device_readings_and_token_counters(tiny) -> None:
    from actors.reward_actor import RewardActor
    from cacovid_rl.rl.trajectory import Trajectory

    cfg, records = tiny
    actor = RewardActor(cfg.to_dict(), "reward-0")
    held = SimpleNamespace(version=actor.worker.version)  # the version already held: no weight fetch
    statuses, payloads = [], []
    for i, rec in enumerate(records[:2]):
        status, payload = actor.run(WorkItem(i, 0, 0, WorkItem.record_to_dict(rec)), held)
        statuses.append(status)
        payloads.append(payload)
    trajs = [Trajectory.from_bytes(p) for p in payloads]
    for status, traj in zip(statuses, trajs, strict=True):
        assert status.status == "ok"
        assert status.video_tokens == traj.num_frames * traj.tokens_per_frame == 128
        assert status.kept_tokens == int(traj.keep_lengths.sum()) > 0
        dev = status.actor.device
        assert dev["on_gpu"] == 0.0 and dev["rss_gb"] > 0 and dev["peak_gb"] >= dev["mem_gb"] > 0
        assert dev["cpu_util"] > 0 and status.actor.pid > 0 and status.actor.actor_started == actor.worker.started
    assert statuses[1].actor.totals == {
        "items": 2,
        "combos": statuses[0].combos + statuses[1].combos,
        "video_tokens": 256,
        "kept_tokens": statuses[0].kept_tokens + statuses[1].kept_tokens,
    }
    m = ClusterMonitor(clock=iter([0.0, 2.0]).__next__).metrics({"reward-0": statuses[1]})
    window = min(2.0, statuses[1].actor.alive_s)  # the actor was up for less than the clock's 2 s
    assert m["perf/video_tokens_per_s"] == pytest.approx(256 / window)
    assert m["mem/actor_peak_gb_max"] == statuses[1].actor.device["peak_gb"]


def test_learner_device_metrics_after_an_update(tiny) -> None:
    from learner.learner_actor import Learner

    cfg, _ = tiny
    learner = Learner(cfg.to_dict(), publishes=False)  # no Ray: nothing is published
    t0 = time.perf_counter()
    first = learner.device_metrics(busy_s=0.5, combos=10)
    assert first["perf/learner_busy"] == 1.0 and first["perf/learner_combos_per_s"] == 20.0
    assert first["mem/learner_peak_gb"] >= first["mem/learner_mem_gb"] > 0
    time.sleep(0.4)
    second = learner.device_metrics(busy_s=0.1, combos=10)
    since = time.perf_counter() - t0  # bounds the window between the two readings from above; the sleep from below
    assert 0.1 / since <= second["perf/learner_busy"] <= 0.1 / 0.4  # 0.1 s busy since the last update ended


def _png_ok(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_questions_and_the_wandb_table_read_back(tiny, tmp_path: Path, monkeypatch) -> None:
    from cacovid_rl.data.prompts import build_prompt
    from cacovid_rl.data.video import read_frames
    from cacovid_rl.eval.samples import pick_retention, sample_questions
    from cacovid_rl.models.loading import load_adapter
    from cacovid_rl.policy.network import CacovidPolicy
    from cacovid_rl.policy.selection import select_tokens
    from cacovid_rl.rl.rewards import compute_reward
    from learner.metrics import MetricsLogger

    cfg, records = tiny
    adapter = load_adapter(cfg.model)
    torch.manual_seed(0)
    policy = CacovidPolicy.from_adapter(adapter, cfg.policy).eval()
    assert pick_retention(cfg.eval.retentions) == 0.1 and pick_retention([0.25, 0.05]) == 0.05
    samples = sample_questions(adapter, policy, records, cfg, n=2)
    assert [s["sample_id"] for s in samples] == [r.sample_id for r in records[:2]]
    for s, rec in zip(samples, records, strict=False):
        with torch.no_grad():
            enc = adapter.encode(
                read_frames(rec.video, 8, cfg.data.max_fps), build_prompt(rec.problem, rec.problem_type)
            )
            want = select_tokens(policy.score(enc), 0.1, cfg.eval.imp_ratio, max_ratio=cfg.eval.max_ratio_scale * 0.1)
        assert s["kept"] == want.tolist() and s["kept_tokens"] == 12 and s["total_tokens"] == 128  # floor(0.1 * 128)
        assert s["reward"] == compute_reward(s["answer"], rec.answer, rec.problem_type, cfg.reward.fix_official_bugs)
        assert s["ground_truth"] == rec.answer and s["question"] == rec.problem.split("\n")[0]
        assert _png_ok(base64.b64decode(s["png_b64"]))
    assert sample_questions(adapter, None, records, cfg) == []  # no policy: nothing to show

    result = {"version": 7, "full": 1.0, "samples": samples}
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # the table's artifact is staged there
    logger = MetricsLogger(cfg, tmp_path)
    assert log_samples(logger, result, tmp_path / "eval") == 2
    logger.close()
    assert "samples" not in result  # the evaluation JSON stays as it was
    written = [(tmp_path / "eval" / f"samples_v000007_{i}.png").read_bytes() for i in range(2)]
    assert all(_png_ok(b) for b in written)

    history, tables = _read_offline_run(tmp_path)
    (row,) = [h for h in history if "eval/samples/_type" in h]  # nested keys joined with "/"
    assert row["update"] == 7 and row["eval/samples/_type"] == "table-file" and row["eval/samples/nrows"] == 2
    # The table itself (with its images) lives in a run_table artifact: read it from the artifact's staged files.
    files = tables["eval/samples.table.json"]
    table = json.loads(Path(files["eval/samples.table.json"]).read_text())
    assert table["columns"] == SAMPLE_COLUMNS and len(table["data"]) == 2
    for got, s, png in zip(table["data"], samples, written, strict=True):
        assert got[:8] == [s[k] for k in SAMPLE_COLUMNS[:8]]
        assert got[8]["_type"] == "image-file" and Path(files[got[8]["path"]]).read_bytes() == png


def _read_offline_run(out_dir: Path, timeout_s: float = 30.0) -> tuple[list[dict], dict[str, dict[str, str]]]:
    """(history rows, {table file: {artifact path: staged local file}} of each run_table artifact) of the one
    offline run under ``out_dir``, once its ``exit`` record is there: ``wandb.finish()`` can return before
    wandb-core has flushed the run file (seen: 1 read in 8 found only the 7-byte header)."""
    records = read_offline_records(out_dir, timeout_s)
    history, tables = [], {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.append({k: v for k, v in items.items() if not k.startswith("_")})
        elif kind == "artifact" and rec.artifact.type == "run_table":
            files = {e.path: e.local_path for e in rec.artifact.manifest.contents}
            tables.update({p: files for p in files if p.endswith(".table.json")})
    return history, tables
