"""Every plot of the evaluation (``eval/plots.py``): what is drawn is the data given, read back from the saved
figures (curve heights, the full-token line, kept and oracle boxes, the overlaid keep probabilities)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cacovid_rl.config import load_config
from cacovid_rl.eval import plots as P
from cacovid_rl.eval.aggregate import aggregate
from cacovid_rl.eval.evaluate import accuracy_table
from cacovid_rl.eval.runs import RunInfo, training_summary
from tests.unit.test_eval_aggregate import fake_runs, rows_with
from tests.unit.test_eval_runs import DEBUG_CONFIG, write_run


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved, kept for inspection (the plots close them after saving)."""
    from matplotlib.figure import Figure

    figs: list = []
    real = Figure.savefig

    def keep(self, *args, **kwargs):
        figs.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figs


def _png_shape(path: Path) -> tuple[int, ...]:
    import matplotlib.image

    return matplotlib.image.imread(path).shape


def _drawn(ax) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The full-token line's height and each method's plotted means, from the axes."""
    lines = {line.get_label(): float(line.get_ydata()[0]) for line in ax.get_lines() if line.get_label()[0] != "_"}
    means = {c.get_label(): tuple(float(y) for y in c.lines[0].get_ydata()) for c in ax.containers}
    return lines, means


def test_training_curves(tmp_path: Path, saved_figures: list) -> None:
    runs = [
        RunInfo(p.name, p, load_config(DEBUG_CONFIG), "", p / "policy", p / "metrics.jsonl")
        for p in (write_run(tmp_path / "a", 0), write_run(tmp_path / "b", 1))
    ]
    assert _png_shape(P.plot_training(runs, tmp_path / "t.png"))[2] == 4  # a decodable RGBA image
    axes = saved_figures[-1].axes
    ax = axes[0]  # rewards: both seeds log the same token reward, so the mean is that curve
    bold = [line for line in ax.get_lines() if line.get_linewidth() == 2 and line.get_label().startswith("token")]
    steps = np.arange(1, 41)
    np.testing.assert_allclose(bold[0].get_xdata(), steps)
    np.testing.assert_allclose(bold[0].get_ydata()[-1], np.mean(0.3 + 0.001 * steps[-2:]))  # window 40 // 20 = 2
    evals = {line.get_label(): line.get_ydata().tolist() for line in axes[1].get_lines()}
    assert evals["cacovid@0.1"] == [60.0] and evals["uniform@0.1"] == [40.0] and evals["full"] == [70.0]
    assert training_summary(runs)["a"]["eval"]["eval/cacovid@0.1"] == [[40.0, 0.6]]
    empty = RunInfo("e", tmp_path / "e", load_config(DEBUG_CONFIG), "", tmp_path / "p", tmp_path / "none.jsonl")
    assert P.plot_training([empty], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_accuracy_of_a_report_and_of_one_evaluation(tmp_path: Path, saved_figures: list) -> None:
    rows = rows_with({"cacovid": [0.8, 0.7], "random": [0.5, 0.4]})
    acc = aggregate(rows, fake_runs(2), [0.1], ["cacovid", "random"])
    assert _png_shape(P.plot_accuracy(acc["all"], [0.1], tmp_path / "a.png", "t"))[2] == 4
    ax = saved_figures[-1].axes[0]
    lines, means = _drawn(ax)
    assert lines["full tokens"] == pytest.approx(80.0)  # 8 of the 10 rows are right with full tokens
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"cacovid", "random", "full tokens"}
    assert means.keys() == {"cacovid", "random"}  # the seed means of 0.8/0.7 and 0.5/0.4:
    assert means["cacovid"] == pytest.approx((75.0,)) and means["random"] == pytest.approx((45.0,))
    result = {"n": 3, "full": 2 / 3, "methods": {"uniform": {"0.1": 1 / 3, "0.5": 2 / 3}}}
    P.plot_accuracy(accuracy_table(result), [0.1, 0.5], tmp_path / "e.png", "one evaluation")
    lines, means = _drawn(saved_figures[-1].axes[0])
    assert lines["full tokens"] == pytest.approx(200 / 3) and means["uniform"] == pytest.approx((100 / 3, 200 / 3))


def test_heatmap_marks_kept_and_oracle_tokens(tmp_path: Path, saved_figures: list) -> None:
    from matplotlib.colors import to_rgba

    scores = np.random.default_rng(0).normal(size=(8, 16))
    q = P.Question(
        sample_id="s",
        kind="colour",
        question="What colour are the dots in the pink box ?",
        answer="A",
        frames=np.zeros((8, 64, 64, 3), dtype=np.uint8),
        token_scores=scores,
        frame_scores=np.zeros(8),
        kept=[0, 17, 7 * 16 + 3],  # frames 0, 1 and 7
        oracle=[17, 7 * 16 + 5],
        answers={"full": "A", "cacovid": "B"},
    )
    assert _png_shape(P.plot_heatmap(q, tmp_path / "h.png"))[2] == 4
    axes = saved_figures[-1].axes
    bottom = [a for a in axes if a.get_title().startswith("s=")]
    assert len(bottom) == 8  # every frame shown (8 <= MAX_HEATMAP_FRAMES)
    lime, white = to_rgba("lime"), to_rgba("white")
    boxes = [(i, p.get_edgecolor()) for i, a in enumerate(bottom) for p in a.patches]
    assert sorted(i for i, c in boxes if c == lime) == [0, 1, 7]
    assert sorted(i for i, c in boxes if c == white) == [1, 7]
    assert [a.get_title() for a in bottom][:2] == ["s=+0.00 keep 1", "s=+0.00 keep 1"]
    overlay = bottom[7].get_images()[-1].get_array()
    np.testing.assert_allclose(np.asarray(overlay), 1 / (1 + np.exp(-scores[7].reshape(4, 4))))


def test_grid_shape() -> None:
    assert P.grid_shape(16, 64, 64) == (4, 4) and P.grid_shape(196, 384, 384) == (14, 14)
    assert P.grid_shape(6, 100, 300) == (1, 6) and P.grid_shape(12, 300, 400) == (3, 4)
