"""The evaluation report: the oracle reference, batched answering, run discovery, aggregation, the target check,
plots and an end-to-end report on a few synthetic questions with the shipped tiny model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cacovid_rl.baselines import ORACLE, SELECTORS, SelectionContext, budget, get_selector
from cacovid_rl.config import load_config
from cacovid_rl.eval import report as R
from cacovid_rl.eval.evaluate import answer_selections, select_all
from cacovid_rl.types import EncodedQuestion, PolicyScores

DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug_local.yaml"


def make_ctx(t: int = 4, n: int = 16, oracle=None, seed: int = 0) -> SelectionContext:
    torch.manual_seed(seed)
    d = 8
    embeds = torch.randn(3 + t * n + 2, d)
    enc = EncodedQuestion(embeds, torch.arange(embeds.shape[0]), 3, t, n)
    return SelectionContext(
        enc=enc,
        scores=PolicyScores(torch.randn(t, n), torch.randn(t)),
        generator=torch.Generator().manual_seed(seed),
        oracle_tokens=oracle,
    )


# ---------------------------------------------------------------------------------------------------------------------
# the oracle reference


def test_oracle_keeps_answer_tokens_and_pads_randomly() -> None:
    ctx = make_ctx(oracle=[5, 21])
    keep = get_selector(ORACLE).select(ctx, 0.1)  # B = 6 of 64
    assert keep.shape == (budget(0.1, 64),) and {5, 21} <= set(keep.tolist())
    assert (keep.diff() > 0).all()
    again = get_selector(ORACLE).select(make_ctx(oracle=[5, 21]), 0.1)
    assert torch.equal(keep, again)  # the padding comes from the context's generator


def test_oracle_truncates_to_the_budget_and_validates() -> None:
    keep = get_selector(ORACLE).select(make_ctx(oracle=list(range(10, 30))), 3 / 64)
    assert keep.tolist() == [10, 11, 12]
    assert get_selector(ORACLE).select(make_ctx(oracle=[]), 0.1).numel() == 6  # a count of zero: random
    with pytest.raises(ValueError, match="oracle_tokens"):
        get_selector(ORACLE).select(make_ctx(), 0.1)
    with pytest.raises(ValueError, match="outside"):
        get_selector(ORACLE).select(make_ctx(oracle=[64]), 0.1)
    assert ORACLE not in SELECTORS  # not a training-free method: it needs labelled answer tokens


@pytest.fixture(scope="module")
def shipped_question(tmp_path_factory: pytest.TempPathFactory):
    """The shipped tiny model and one real synthetic question encoded by it (loads in about a second)."""
    from cacovid_rl.config import ModelConfig
    from cacovid_rl.data.prompts import build_prompt
    from cacovid_rl.data.records import load_records
    from cacovid_rl.data.synthetic import make_synthetic
    from cacovid_rl.data.video import read_frames
    from cacovid_rl.models.loading import load_adapter

    data = tmp_path_factory.mktemp("report_q")
    make_synthetic(data, n=3, seed=11, fractions=(0.0, 0.0, 1.0))
    rec = load_records(data / "test.json", data).records[0]
    adapter = load_adapter(ModelConfig(path="tiny"))
    with torch.no_grad():
        enc = adapter.encode(read_frames(rec.video, 8, 1.0), build_prompt(rec.problem, rec.problem_type))
    return adapter, enc


def test_select_all_skips_the_oracle_without_tokens_and_memoises_fastv(shipped_question, monkeypatch) -> None:
    """FastV on the shipped model: its selection is the top-B of the model's own early-layer attention (computed
    here once, directly), and ``select_all`` asks the model for that attention once for all retentions."""
    adapter, enc = shipped_question
    with torch.no_grad():
        attn = adapter.early_layer_attention(enc, layer=2).float().reshape(-1)
    calls = []
    real = type(adapter).early_layer_attention

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(adapter), "early_layer_attention", counted)
    ctx = SelectionContext(enc=enc, adapter=adapter, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = select_all(ctx, ["fastv", "uniform", ORACLE], [0.1, 0.25, 0.5])
    assert {m for m, _ in out} == {"fastv", "uniform"} and len(calls) == 1
    total = enc.num_video_tokens
    for r in (0.1, 0.25, 0.5):
        b = budget(r, total)
        top = set(torch.topk(attn, b).indices.tolist())
        assert set(out[("fastv", r)].tolist()) == top, r  # (the tiny model's attention has no ties at the cut)
        assert out[("fastv", r)].numel() == b


def test_answer_selections_batches_equal_sizes(shipped_question, monkeypatch) -> None:
    """The shipped model answers each selection as it does alone, while selections of one size share a forward."""
    adapter, enc = shipped_question
    sel = {"a": torch.tensor([0, 1, 40]), "b": torch.tensor([17, 33, 90]), "c": torch.arange(0, 128, 4)}
    with torch.no_grad():
        alone = {k: adapter.generate(enc, v[None], 4)[0] for k, v in sel.items()}
    batches: list[int] = []
    real = type(adapter).generate

    def recorded(self, enc, keep, max_new_tokens):
        batches.append(0 if keep is None else keep.shape[0])
        return real(self, enc, keep, max_new_tokens)

    monkeypatch.setattr(type(adapter), "generate", recorded)
    with torch.no_grad():
        answers = answer_selections(adapter, enc, sel, 4)
    assert answers == alone and sorted(batches) == [1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# runs and configs


def _write_run(path: Path, seed: int, with_config: bool = True) -> Path:
    (path / "policy").mkdir(parents=True)
    (path / "policy" / "policy_config.json").write_text("{}")
    if with_config:
        cfg = load_config(DEBUG_CONFIG, [f"seed={seed}"])
        (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    rows = [
        {
            "step": s,
            "reward/token_mean": 0.3 + 0.001 * s,
            "reward/frame_mean": 0.5,
            "rollout/rate_mean": 0.0625,
            "loss/total": -0.001,
            "loss/token": -0.001,
            "loss/frame": 0.0,
        }
        for s in range(1, 41)
    ]
    rows.append({"step": 40, "eval/cacovid@0.1": 0.6, "eval/uniform@0.1": 0.4, "eval/full": 0.7})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_discover_and_load_runs(tmp_path: Path) -> None:
    for s in (2, 0, 1):
        _write_run(tmp_path / f"seed{s}", s)
    (tmp_path / "notes").mkdir()
    assert [p.name for p in R.discover_runs(tmp_path)] == ["seed0", "seed1", "seed2"]
    assert R.discover_runs(tmp_path / "seed1") == [tmp_path / "seed1"]
    runs = R.load_runs(tmp_path)
    assert [r.cfg.seed for r in runs] == [0, 1, 2] and runs[0].config_source.endswith("config.yaml")
    with pytest.raises(FileNotFoundError, match="no run directories"):
        R.discover_runs(tmp_path / "notes")


def test_run_config_from_wandb_or_fallback(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r", 0, with_config=False)
    with pytest.raises(FileNotFoundError, match="no resolved config"):
        R.load_run_config(run)
    cfg, source = R.load_run_config(run, DEBUG_CONFIG)
    assert "fallback" in source and cfg.model.path == "tiny"
    files = run / "wandb" / "offline-run-1" / "files"
    files.mkdir(parents=True)
    raw = load_config(DEBUG_CONFIG, ["seed=7"]).to_dict()
    wandb_cfg = {"wandb_version": 1, "_wandb": {"value": {}}, **{k: {"value": v} for k, v in raw.items()}}
    (files / "config.yaml").write_text(yaml.safe_dump(wandb_cfg))
    cfg, source = R.load_run_config(run)
    assert cfg.seed == 7 and source.endswith("files/config.yaml")


# ---------------------------------------------------------------------------------------------------------------------
# aggregation and the target


def _rows(runs_acc: dict[str, dict[str, list[float]]], n: int = 10) -> list[dict]:
    """Per-question rows whose per-seed accuracies are exactly the given fractions."""
    rows = []
    for i in range(n):
        row = {"sample_id": str(i), "kind": "colour" if i % 2 else "count", "full": 1.0 if i < 8 else 0.0}
        for method, per_seed in runs_acc.items():
            for s, acc in enumerate(per_seed):
                key = f"{method}@0.1@seed{s}" if method in R.SEEDED else f"{method}@0.1"
                row[key] = 1.0 if i < round(acc * n) else 0.0
        rows.append(row)
    return rows


def _fake_runs(k: int) -> list[R.RunInfo]:
    cfg = load_config(DEBUG_CONFIG)
    return [R.RunInfo(f"seed{s}", Path(f"/x/seed{s}"), cfg, "", Path("p"), Path("m")) for s in range(k)]


def test_aggregate_mean_std_and_target() -> None:
    runs = _fake_runs(3)
    rows = _rows({"cacovid": [0.7, 0.7, 0.6], "random": [0.5, 0.4, 0.5], "uniform": [0.5]})
    acc = R.aggregate(rows, runs, [0.1], ["cacovid", "random", "uniform"])
    assert acc["all"]["full"]["mean"] == pytest.approx(0.8)
    cac = acc["all"]["cacovid"]["0.1"]
    assert cac["mean"] == pytest.approx(0.6667, abs=1e-4) and cac["std"] == pytest.approx(
        np.std([0.7, 0.7, 0.6], ddof=1)
    )
    assert acc["all"]["uniform"]["0.1"]["per_seed"] == [0.5, 0.5, 0.5]  # deterministic: shared by every seed
    assert set(acc) == {"all", "colour", "count"} and acc["colour"]["n"] == 5
    tgt = R.target_check(acc)
    assert tgt["fraction_of_full"] == pytest.approx(0.6667 / 0.8, abs=1e-3) and tgt["fraction_met"] is False
    assert tgt["best_baseline"] in ("random", "uniform") and tgt["separated"] == {"random": True, "uniform": True}
    assert tgt["met"] is False
    for row, hit in zip(rows, [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0], strict=False):  # answer kept or not
        row.update({f"{R.KEPT}cacovid@0.1@{run.name}": hit for run in runs})
    kept = R.aggregate(rows, runs, [0.1], ["cacovid", "uniform"], prefix=R.KEPT)["all"]
    assert kept["n"] == 8 and "uniform" not in kept  # rows without the key do not count
    assert kept["cacovid"]["0.1"]["mean"] == pytest.approx(0.75)
    rows = _rows({"cacovid": [0.8, 0.8, 0.8], "random": [0.5, 0.4, 0.8]})
    tgt = R.target_check(R.aggregate(rows, runs, [0.1], ["cacovid", "random"]))
    assert tgt["fraction_met"] and not tgt["separated"]["random"] and not tgt["met"]  # seed ranges overlap


# ---------------------------------------------------------------------------------------------------------------------
# plots


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure the report saves, kept for inspection (the report closes them after saving)."""
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


def test_plots_write_pngs(tmp_path: Path, saved_figures: list) -> None:
    """What the plots draw is the data they were given: curve heights, the full-token line, kept and oracle boxes,
    the overlaid keep probabilities; the PNGs decode at the figure's size."""
    from matplotlib.colors import to_rgba

    runs = [
        R.RunInfo(p.name, p, load_config(DEBUG_CONFIG), "", p / "policy", p / "metrics.jsonl")
        for p in (_write_run(tmp_path / "a", 0), _write_run(tmp_path / "b", 1))
    ]
    assert _png_shape(R.plot_training(runs, tmp_path / "t.png"))[2] == 4  # a decodable RGBA image
    ax = saved_figures[-1].axes[0]  # rewards: both seeds log the same token reward, so the mean is that curve
    bold = [line for line in ax.get_lines() if line.get_linewidth() == 2 and line.get_label().startswith("token")]
    steps = np.arange(1, 41)
    np.testing.assert_allclose(bold[0].get_xdata(), steps)
    np.testing.assert_allclose(bold[0].get_ydata()[-1], np.mean(0.3 + 0.001 * steps[-2:]))  # window 40 // 20 = 2
    summary = R.training_summary(runs)
    assert summary["a"]["updates"] == 40 and summary["a"]["eval"]["eval/cacovid@0.1"] == [[40.0, 0.6]]

    rows = _rows({"cacovid": [0.8, 0.7], "random": [0.5, 0.4]})
    # Runs named as the rows' seeds (with the runs above, named a and b, no method matched and the old PNG-size
    # check passed on a plot holding only the full-token line).
    acc = R.aggregate(rows, _fake_runs(2), [0.1], ["cacovid", "random"])
    assert _png_shape(R.plot_accuracy(acc, [0.1], tmp_path / "a.png", "t"))[2] == 4
    ax = saved_figures[-1].axes[0]
    heights = {line.get_label(): float(line.get_ydata()[0]) for line in ax.get_lines() if line.get_label()[0] != "_"}
    assert heights["full tokens"] == pytest.approx(80.0)  # 8 of the 10 rows are right with full tokens
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend == {"cacovid", "random", "full tokens"}
    means = {c.get_label(): float(c.lines[0].get_ydata()[0]) for c in ax.containers}  # one errorbar per method
    assert means == pytest.approx({"cacovid": 75.0, "random": 45.0})  # the seed means of 0.8/0.7 and 0.5/0.4

    scores = np.random.default_rng(0).normal(size=(8, 16))
    q = R.Question(
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
    assert _png_shape(R.plot_heatmap(q, tmp_path / "h.png"))[2] == 4
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
    assert R.grid_shape(16, 64, 64) == (4, 4) and R.grid_shape(196, 384, 384) == (14, 14)
    assert R.grid_shape(6, 100, 300) == (1, 6) and R.grid_shape(12, 300, 400) == (3, 4)


# ---------------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_report_end_to_end(tmp_path: Path) -> None:
    """Two untrained "seeds" on a few synthetic questions: JSON, Markdown and PNGs, oracle included."""
    from cacovid_rl.data.synthetic import make_synthetic
    from cacovid_rl.models.loading import load_adapter
    from cacovid_rl.policy.network import CacovidPolicy

    data = tmp_path / "data"
    make_synthetic(data, n=6, seed=5, fractions=(0.0, 0.0, 1.0))
    cfg = load_config(DEBUG_CONFIG, [f"data.eval_path={data / 'test.json'}", f"data.video_root={data}"])
    adapter = load_adapter(cfg.model)
    for s in (0, 1):
        run = _write_run(tmp_path / "runs" / f"seed{s}", s, with_config=False)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.replace(seed=s).to_dict()))
        torch.manual_seed(s)
        CacovidPolicy.from_adapter(adapter).save_pretrained(run / "policy")
    args = argparse.Namespace(run=str(tmp_path / "runs"), out="", retentions=[0.1, 0.5], heatmaps=2, quiet=True)
    assert R.main(args) == 0
    out = tmp_path / "runs" / "report"
    rep = json.loads((out / "report.json").read_text())
    n = len(json.loads((data / "test.json").read_text()))
    assert rep["eval"]["n"] == n and [r["seed"] for r in rep["runs"]] == [0, 1]
    table = rep["accuracy"]["all"]
    assert set(table) >= {"full", "cacovid", "oracle", *R.BASELINES}
    assert len(json.loads((out / "per_question.json").read_text())["rows"]) == n
    assert len(table["cacovid"]["0.1"]["per_seed"]) == 2 and rep["target"]["evaluated"]
    kept = rep["answer_kept"]  # every synthetic question knows its answer token; the oracle always keeps it
    assert kept["n"] == n and kept["oracle"]["0.1"]["mean"] == 1.0
    # Recomputed here from the data: the full-token accuracy (one plain generation per question) and how often the
    # uniform selection keeps an answer token (its kept indices against the records' oracle tokens).
    from cacovid_rl.data.prompts import build_prompt
    from cacovid_rl.data.records import load_records
    from cacovid_rl.data.video import read_frames
    from cacovid_rl.rl.rewards import compute_reward

    raw = json.loads((data / "test.json").read_text())  # load_records keeps the file order
    full, uniform_kept = [], {0.1: [], 0.5: []}
    for rec, raw_rec in zip(load_records(data / "test.json", data).records, raw, strict=True):
        with torch.no_grad():
            enc = adapter.encode(
                read_frames(rec.video, cfg.data.num_frames, cfg.data.max_fps),
                build_prompt(rec.problem, rec.problem_type),
            )
            answer = adapter.generate(enc, None, cfg.model.max_new_tokens)[0]
        full.append(compute_reward(answer, rec.answer, rec.problem_type, cfg.reward.fix_official_bugs))
        oracle = set(raw_rec["meta"]["oracle_tokens"])
        for r in uniform_kept:
            keep = get_selector("uniform").select(SelectionContext(enc=enc), r)
            uniform_kept[r].append(float(bool(set(keep.tolist()) & oracle)))
    assert table["full"]["mean"] == pytest.approx(np.mean(full))
    for r, hits in uniform_kept.items():
        assert kept["uniform"][str(r)]["mean"] == pytest.approx(np.mean(hits)), r
    assert kept["uniform"]["0.1"]["mean"] < 1.0  # a question-blind selection misses some answers
    md = (out / "report.md").read_text()
    assert "## How often the answer's tokens are kept" in md
    assert "| **cacovid** |" in md and "oracle" in md and "![heatmap](heatmap_0.png)" in md
    for name in ("accuracy_vs_retention.png", "training_curves.png", "heatmap_0.png", "heatmap_1.png"):
        assert _png_shape(out / name)[2] == 4, name  # written and decodable; their content: test_plots_write_pngs
    assert R.main(argparse.Namespace(run=str(tmp_path / "nowhere"), out="")) == 2
