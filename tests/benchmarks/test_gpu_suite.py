"""The GPU suite (issue 17) in its CPU quick mode: the same code paths as the GPU run, at tiny widths.

What is checked: every section's JSON schema and that each comparison has both sides with finite values; that the
JSON, the Markdown table and the PNG are written; that ``--sections`` picks (and orders) sections; that a section
which raises is recorded and the others still run; that a run cut short keeps the sections finished before it.
The 7B config JSONs are checked against the public architectures (parameter counts on the meta device).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.gpu_suite import main
from benchmarks.gpu_suite.sections import SECTIONS

MACHINE_KEYS = {"cpu_model", "cores", "device", "torch", "transformers", "ray"}


def load(out: Path) -> dict:
    data = json.loads(out.read_text())
    assert data["benchmark"] == "gpu_suite"
    assert set(data["machine"]) >= MACHINE_KEYS
    return data


def check_comparisons(key: str, section: dict) -> None:
    assert section["status"] == "ok", (key, section.get("error"))
    assert section["comparisons"], f"section {key} compares nothing"
    for c in section["comparisons"]:
        assert set(c) >= {"what", "a", "a_value", "b", "b_value", "unit"}
        assert c["a"] and c["b"] and c["a"] != c["b"], c
        assert math.isfinite(c["a_value"]) and math.isfinite(c["b_value"]), c
    assert section["seconds"] >= 0


def is_stats(d: dict) -> bool:
    return {"median", "p10", "p90", "samples"} <= set(d) and d["p10"] <= d["median"] <= d["p90"] and d["median"] > 0


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gpu_suite") / "gpu_suite.json"
    returned = main(["--device", "cpu", "--quick", "--out", str(out)])
    assert returned["failed"] == []
    return load(out), out


@pytest.mark.slow
@pytest.mark.ray
def test_quick_run_writes_every_section(full_run):
    data, out = full_run
    res = data["results"]
    assert data["quick"] is True and data["command"].startswith("python -m benchmarks.gpu_suite --device cpu --quick")
    assert list(res["sections"]) == list(SECTIONS)  # all of a-h, in order
    for key, section in res["sections"].items():
        check_comparisons(key, section)
    assert res["device_peak"]["bf16_tflops"] is None  # CPU: no physical-limit ratio
    assert {"llava_onevision", "qwen2_5_vl"} <= set(res["models"])
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| ") >= sum(len(s["comparisons"]) for s in res["sections"].values())
    assert out.with_suffix(".png").stat().st_size > 5000


@pytest.mark.slow
@pytest.mark.ray
def test_quick_run_section_contents(full_run):
    s = full_run[0]["results"]["sections"]
    # (a) sdpa vs eager on gapped pruned inputs agree; batched answers equal HF generate's on the same sequences
    for model in s["a"]["models"].values():
        assert model["gapped_positions"] and model["pruned_seq_len"] > 0
        assert model["logit_diffs"]["sdpa_vs_eager"]["max_abs_diff"] < 1e-3
        assert model["generate"]["text_agreement"] == 1.0 and model["generate"]["reward_agreement"] == 1.0
    assert s["a"]["flash_attn"] != "installed" or "flash_attention_2_vs_sdpa" in model["logit_diffs"]
    # (b) both keep rates, every path timed, rewards identical across paths
    assert set(s["b"]["rates"]) == {"0.02", "0.12"}
    for rate in s["b"]["rates"].values():
        assert set(rate["combos_per_s"]) == {"actor", "reference", "reference_capped", "naive", "prefill_floor"}
        assert all(is_stats(v) for v in rate["combos_per_s"].values())
        assert all(v == 1.0 for v in rate["reward_agreement"].values()), rate["reward_agreement"]
    # (c) CaCoVID and every baseline timed; the paper's figures recorded
    assert {"cacovid", "uniform", "random", "fastv", "visionzip", "divprune"} <= set(s["c"]["latency_s"])
    assert s["c"]["paper"]["cacovid"] == 11.2
    # (d) pruned prefill is shorter; no physical limit on a CPU
    for model in s["d"]["models"].values():
        p = model["prefill"]
        assert p["0.1"]["seq_len"] < p["0.25"]["seq_len"] < p["full"]["seq_len"]
        assert p["full"]["limit_s"] is None and p["full"]["flops"] > 0
    # (e) an update ran; (f) 1 and 2 actors reached every version; (g) chunk sizes grow with the budget
    assert s["e"]["s_per_question"] > 0 and s["e"]["questions_per_update"] == 2
    assert set(s["f"]["actors"]) == {"1", "2"} and all(is_stats(v["to_all_s"]) for v in s["f"]["actors"].values())
    for rate in s["g"]["rates"].values():
        assert [r["combos_per_forward"] for r in rate["runs"]] == [1, 8, 32]
        assert rate["chunk_for_budget_gib"]["80"] >= rate["chunk_for_budget_gib"]["12"] >= 1
    # (h) the loop consumed every question once, with 2 actors
    assert s["h"]["consumed"] > 0 and s["h"]["duplicates"] == 0 and s["h"]["config"]["actors"] == 2
    assert 0 < s["h"]["actor_utilisation"] <= 1.0


def test_sections_pick_and_a_failing_section_is_recorded(tmp_path):
    out = tmp_path / "gs.json"
    returned = main(["--device", "cpu", "--quick", "--out", str(out), "--sections", "d,c", "--fail-section", "d",
                     "--no-plot"])  # fmt: skip
    assert returned["failed"] == ["d"]
    sections = load(out)["results"]["sections"]
    assert list(sections) == ["d", "c"]  # only the picked ones, in the given order
    assert sections["d"]["status"] == "error" and "raised on purpose" in sections["d"]["error"]
    check_comparisons("c", sections["c"])  # the run went on after the failure
    assert "**error**" in out.with_suffix(".md").read_text()


def test_a_run_cut_short_keeps_finished_sections(tmp_path):
    out = tmp_path / "gs.json"
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--quick", "--out", str(out), "--sections", "c,d", "--fail-section", "d!"])
    sections = load(out)["results"]["sections"]
    assert list(sections) == ["c"]  # written right after c; d never finished
    check_comparisons("c", sections["c"])


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--quick", "--out", str(tmp_path / "x.json"), "--sections", "a,z"])


@pytest.mark.parametrize(
    ("family", "total_b", "layers", "hidden"), [("llava_onevision", 8.03, 28, 3584), ("qwen2_5_vl", 8.29, 28, 3584)]
)
def test_7b_configs_build_the_public_architectures(family, total_b, layers, hidden):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from benchmarks.gpu_suite.models import load_config_dict

    raw = load_config_dict(family)
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text = config.get_text_config()
    assert (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads) == (layers, hidden, 4)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(total_b, abs=0.01)
