"""Smoke tests of the benchmark scripts: each runs with ``--quick`` and must write a well-formed result.

Not timed tests: they check that every script still runs end to end against the current library and that its
JSON keeps the keys ``benchmarks/README.md`` and readers rely on (machine facts, the measured quantities, sane
values), plus the PNG next to it. Run in-process (``main(argv)``) to avoid re-importing torch per script.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MACHINE_KEYS = {"cpu_model", "cores", "device", "torch", "transformers", "ray", "torch_threads"}
STATS_KEYS = {"median", "p10", "p90", "n", "samples", "spread"}


def run(name: str, tmp_path: Path, *extra: str) -> dict:
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    out = tmp_path / f"{name}.json"
    module.main(["--quick", "--out", str(out), *extra])
    data = json.loads(out.read_text())
    assert data["benchmark"] == name
    assert data["quick"] is True
    assert data["command"].startswith(f"python -m benchmarks.{name} --quick")
    assert set(data["machine"]) >= MACHINE_KEYS
    assert data["machine"]["cores"] >= 1
    assert out.with_suffix(".png").stat().st_size > 1000
    return data


def is_stats(d: dict) -> bool:
    return set(d) >= STATS_KEYS and d["p10"] <= d["median"] <= d["p90"] and d["median"] > 0


@pytest.mark.slow  # 104 s on a loaded 2-core machine
def test_pruning_latency(tmp_path):
    res = run("pruning_latency", tmp_path)["results"]
    assert set(res["widths"]) == {"tiny", "7b"}
    for width in res["widths"].values():
        for per_method in width["latency"].values():
            assert {"cacovid", "cacovid_policy_forward", "cacovid_selection", "uniform", "random", "fastv",
                    "visionzip", "divprune"} <= set(per_method)  # fmt: skip
            assert all(is_stats(s) for s in per_method.values())
        assert set(width["prefill"]["time"]) == {"full", "0.25", "0.1"}
        assert (
            width["prefill"]["seq_len"]["0.1"]
            < width["prefill"]["seq_len"]["0.25"]
            < width["prefill"]["seq_len"]["full"]
        )
    assert res["widths"]["7b"]["hidden_size"] == 3584
    assert res["widths"]["7b"]["dtype"] == "bfloat16"
    assert "extrapolated_28_layers_s" in res["widths"]["7b"]["prefill"]


def test_reward_throughput(tmp_path):
    res = run("reward_throughput", tmp_path, "--ref-max-new-tokens", "32")["results"]
    assert set(res["combos_per_s"]) == {"actor", "reference", "reference_capped", "naive", "prefill_floor"}
    assert is_stats(res["actor_over_floor"])
    assert all(is_stats(s) for s in res["combos_per_s"].values())
    assert set(res["targets"]) == {"reference", "naive"}
    # the three paths must give identical rewards on identical combinations
    assert all(v == 1.0 for v in res["reward_agreement"].values()), res["reward_agreement"]
    # The reference samples with top_p = 0.01: only the most likely token survives, so every row is the greedy one.
    assert res["reference_sampled_equals_greedy"] == 1.0


def test_actor_memory(tmp_path):
    res = run("actor_memory", tmp_path)["results"]
    sc = res["scenarios"]["tiny-native"]
    assert [r["combos_per_forward"] for r in sc["runs"]] == [1, 4]
    assert all(r["peak_bytes"] >= r["baseline_bytes"] > 0 for r in sc["runs"])
    assert sc["estimate_bytes_per_combo"] > 0
    for width in ("tiny", "7b"):
        lengths = res["chunk_sizes"][width]["lengths"]
        for row in lengths.values():
            chunks = [row["chunk"][str(b)] for b in (1, 4, 16, 40, 70)]
            assert chunks == sorted(chunks) and chunks[0] >= 1  # more memory never means smaller chunks
    assert res["chunk_sizes"]["7b"]["layers"] == 28


@pytest.mark.ray
def test_weight_broadcast(tmp_path):
    res = run("weight_broadcast", tmp_path)["results"]
    tiny = res["sizes"]["tiny"]
    assert set(tiny["actors"]) == {"1", "2"}
    for st in tiny["actors"].values():
        assert set(st) >= {"to_all_s", "flatten_s", "put_checksum_s", "fanout_s", "actor_load_s", "sync_latency_s",
                           "crc32_checksum_s", "xxh3_128_s"}  # fmt: skip
        assert is_stats(st["to_all_s"])
    assert tiny["bytes"] > 0 and tiny["params"] > 0


@pytest.mark.ray
@pytest.mark.slow  # 52 s here (a real 2-update training run on Ray)
def test_training_throughput(tmp_path):
    res = run("training_throughput", tmp_path)["results"]
    r = res["runs"]["1"]
    assert r["combos_per_s"] > 0 and r["updates_per_s"] > 0
    assert r["consumed"] > 0 and r["duplicates"] == 0
    assert r["bytes_per_question"] > 0 and r["learner_s_per_question"] > 0
    # Quick mode: one actor, 2 updates of 4 questions on the debug config (G = 28 combinations x 3 iterations).
    assert r["consumed"] == 8 and r["combos_per_question"] == 28 * 3
    assert r["combos_per_s"] == pytest.approx(r["questions_per_s"] * 28 * 3)
    assert len(r["rounds"]) == 1 and res["learner_ceiling_combos_per_s"] > 0
    rows = res["transfer_7b"]["rows"]
    assert rows["ship_embeddings_fp16 (this design)"]["bytes"] > rows["ship_frames_uint8"]["bytes"]


@pytest.mark.slow  # ~40 s: 7 passes of 3 tiny-model questions
def test_prefetch(tmp_path):
    data = run("prefetch", tmp_path)
    res = data["results"]
    kinds = ("no_prefetch", "prefetch", "prefetch_encode")
    assert set(res["series"]) == {"scoring_only", *(f"{m}/{k}" for m in ("cpu", "io") for k in kinds)}
    assert res["trajectories_identical"] is True  # prefetching (and encoding ahead) must not change a trajectory
    assert res["series"]["scoring_only"]["of_scoring_only"] == 1.0
    for name, s in res["series"].items():
        assert 0 < s["busy"] <= 1.0 and s["questions_per_s"] > 0 and s["cpu_cores"] > 0 and s["encode_s"] > 0
        hinted = name.endswith(("/prefetch", "/prefetch_encode"))
        assert [r["prefetched"] for r in s["runs"]] == [3 if hinted else 0]
    assert 0 < res["encode_share"] < 1
    cpu, io = res["modes"]["cpu"], res["modes"]["io"]
    assert cpu["decode_repeats"] >= 1 and io["wait_s"] >= 0
    # The io mode's slowdown is a wait: its decode uses far less CPU than its wall time, unlike the repeated decode.
    assert io["slowed_decode_cpu_s"] < 0.5 * io["slowed_decode_s"]
    assert set(res["load_avg_1m"]) == {"start", "median", "max", "end"}
    assert (tmp_path / "prefetch.md").read_text().count("|") > 20


@pytest.mark.ray
@pytest.mark.slow  # a real 3-update training run on Ray, plus the 7B sweep
def test_cluster_simulation(tmp_path):
    res = run("cluster_simulation", tmp_path, "--steps", "3")["results"]
    (v,) = res["validation"]  # --quick: the first pair only, 1 actor x 1 learner
    assert (v["actors"], v["learners"]) == (1, 1) and v["questions_per_s"] > 0
    assert v["run_reward_s"] > 0 and v["run_learner_s"] > 0
    cores = v["cpu_cores"]
    assert cores["workers"] > 0.05 and cores["window_s"] > 0  # the actor and learner processes were seen working
    assert v["reserved_cores"] == pytest.approx(cores["others"] + cores["driver"] + cores["ray_runtime"])
    assert 0 < res["cpu_detail"]["cpu_share"] <= 1.0
    # The per-version publish is the warm put, far below the first put's object-store client set-up.
    assert res["costs"]["cpu-tiny"]["publish_s"] < res["cpu_detail"]["publish_first_s"] + 0.03
    assert "shipped: 32 actors, 4 learners, 8 q/step, staleness 7, prefetch" in " ".join(res["production"])
