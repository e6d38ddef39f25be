"""Every benchmark PNG is redrawn from its committed JSON (``--plot-only``) and says what it shows.

A figure is read without its README: its title names the device and the model, and every series it draws
(bar, line or legend entry) is defined in the caption under the panels.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PLOTTED = ["reward_throughput", "pruning_latency", "weight_broadcast", "training_throughput", "actor_memory"]
# The names each figure draws, which its caption must define.
SERIES = {
    "reward_throughput": ["actor", "reference", "reference_capped", "naive", "prefill_floor"],
    "pruning_latency": [
        "cacovid",
        "cacovid_policy_forward",
        "cacovid_selection",
        "fastv",
        "visionzip",
        "divprune",
        "proportional",
    ],
    "weight_broadcast": ["tiny", "7b", "flatten", "put + CRC32", "fetch + CRC32 + load"],
    "training_throughput": ["measured", "linear in actors", "2-core ceiling", "learner ceiling", "core-limited ideal"],
    "actor_memory": ["measured peak delta", "fit fixed + estimate", "tiny-native", "tiny-long", "7b-1layer"],
}


@pytest.mark.parametrize("name", PLOTTED)
def test_plot_only_redraws_a_self_describing_figure(name: str, tmp_path, monkeypatch):
    import benchmarks.common as common

    module = importlib.import_module(f"benchmarks.{name}")
    shutil.copy(RESULTS / f"{name}.json", tmp_path / f"{name}.json")
    texts: list[str] = []
    save = common.save_figure

    def capture(fig, path):  # every text the figure holds, as drawn
        texts.extend(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
        return save(fig, path)

    monkeypatch.setattr(module, "save_figure", capture, raising=False)
    monkeypatch.setattr(common, "save_figure", capture)
    module.main(["--plot-only", "--out", str(tmp_path / f"{name}.json")])
    png = tmp_path / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = common.load_result(tmp_path / f"{name}.json")
    title = next(t for t in texts if t.startswith(tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")) and "\ndevice: " in t)
    assert "model: " in title and payload["machine"]["cpu_model"] in title
    caption = next(t for t in texts if t.count(": ") >= 3 and "\n" in t and "device: " not in t)
    for series in SERIES[name]:
        assert series in caption, f"{name}: '{series}' is drawn but not defined"
